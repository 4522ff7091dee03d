//! Updating an SCTP checksum (CRC32c, reflected, polynomial 0x1EDC6F41) for
//! changed ports without reading the whole packet.
//!
//! A CRC with fixed initial value and final xor is affine in the message: for
//! two messages of equal length, crc(A) ^ crc(B) = raw(A ^ B), where `raw` is
//! the plain remainder (zero initial value, no final xor). Ports are the
//! packet's first four bytes, so the difference is those four bytes followed
//! by `len - 4` zero bytes: their remainder, advanced over the zeros by one
//! multiplication with x^(8 * (len - 4)) mod P.

/// The reflected polynomial.
const POLY: u32 = 0x82f6_3b78;

/// `a` times x, mod P (reflected: a shift towards bit 0).
#[inline(always)]
const fn times_x(a: u32) -> u32 {
    if a & 1 != 0 { (a >> 1) ^ POLY } else { a >> 1 }
}

/// a * b mod P, both in reflected form (bit 31 is x^0).
#[inline(always)]
const fn mul(a: u32, b: u32) -> u32 {
    let mut product = 0;
    let mut b = b;
    let mut i = 0;
    while i < 32 {
        if a & (1 << (31 - i)) != 0 {
            product ^= b;
        }
        b = times_x(b);
        i += 1;
    }
    product
}

/// x^(2^k) mod P for k = 0..32, reflected.
const POWERS: [u32; 32] = powers();

const fn powers() -> [u32; 32] {
    let mut table = [0u32; 32];
    // x^1 reflected: bit 30.
    let mut p: u32 = 1 << 30;
    let mut k = 0;
    while k < 32 {
        table[k] = p;
        p = mul(p, p);
        k += 1;
    }
    table
}

/// The longest SCTP packet whose CRC can be updated (jumbo frames fit). A
/// power of two, so that masking an index proves its bound to the verifier.
pub const MAX_LEN: usize = 16384;

/// x^(8n) mod P for every n below MAX_LEN, reflected: a table, so that the
/// datapath needs no loop whose length the verifier would have to unroll.
#[allow(long_running_const_eval)]
static SHIFTS: [u32; MAX_LEN] = shifts();

const fn shifts() -> [u32; MAX_LEN] {
    let mut table = [0u32; MAX_LEN];
    let mut value: u32 = 1 << 31; // x^0
    let mut n = 0;
    while n < MAX_LEN {
        table[n] = value;
        value = mul(value, POWERS[3]);
        n += 1;
    }
    table
}

/// `crc` carried on over `data` bit by bit: the register alone, without
/// the initial value or final xor that the CRC proper adds.
#[inline(always)]
fn feed<const N: usize>(mut crc: u32, data: &[u8; N]) -> u32 {
    let mut i = 0;
    while i < N {
        crc ^= data[i] as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = times_x(crc);
            bit += 1;
        }
        i += 1;
    }
    crc
}

/// The plain remainder of four bytes.
#[inline(always)]
fn raw4(bytes: [u8; 4]) -> u32 {
    feed(0, &bytes)
}

/// The CRC32c of a short message (as computed; SCTP stores it
/// little-endian).
#[inline(always)]
pub fn checksum<const N: usize>(data: &[u8; N]) -> u32 {
    !feed(!0, data)
}

/// The CRC32c of a `len`-byte message whose first four bytes changed from
/// `old` to `new`, given its CRC before (`crc`, as computed, not as stored);
/// None for a message longer than MAX_LEN.
#[inline(always)]
pub fn update_head4(crc: u32, old: [u8; 4], new: [u8; 4], len: usize) -> Option<u32> {
    update_head4_with(crc, old, new, len, change)
}

/// `update_head4`, with `change` computed by the function given: the
/// datapath passes a copy of it that the verifier checks once.
#[inline(always)]
pub fn update_head4_with(
    crc: u32,
    old: [u8; 4],
    new: [u8; 4],
    len: usize,
    change: impl FnOnce(u32, u32) -> u32,
) -> Option<u32> {
    let zeros = len.checked_sub(4)?;
    if zeros >= MAX_LEN {
        return None;
    }
    let diff = u32::from_ne_bytes(old) ^ u32::from_ne_bytes(new);
    Some(crc ^ change(diff, zeros as u32))
}

/// What a message's CRC changes by when its first four bytes change by
/// `diff` (as they sit in memory) and `zeros` bytes follow them; `zeros`
/// is taken modulo MAX_LEN. The costly part of `update_head4`, apart, so
/// that the datapath can verify it once (a global function).
#[inline(always)]
pub fn change(diff: u32, zeros: u32) -> u32 {
    let shift = SHIFTS[zeros as usize & (MAX_LEN - 1)];
    mul(shift, raw4(diff.to_ne_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit by bit, as a reference.
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for byte in data {
            crc ^= *byte as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn too_long_is_none() {
        assert_eq!(update_head4(0, [0; 4], [1; 4], MAX_LEN + 4), None);
    }

    #[test]
    fn known_value() {
        // The check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(checksum(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn updating_the_first_four_bytes_matches_recomputation() {
        let mut seed = 0x1234_5678u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for len in [4usize, 5, 12, 16, 33, 100, 1480, 9000, MAX_LEN + 3] {
            let mut packet = [0u8; MAX_LEN + 3];
            for b in packet.iter_mut().take(len) {
                *b = next() as u8;
            }
            let before = crc32c(&packet[..len]);
            let old = [packet[0], packet[1], packet[2], packet[3]];
            let new = next().to_be_bytes();
            packet[..4].copy_from_slice(&new);
            let after = crc32c(&packet[..len]);
            assert_eq!(
                update_head4(before, old, new, len),
                Some(after),
                "len {len}"
            );
        }
    }
}
