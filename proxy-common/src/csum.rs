//! The Internet checksum (RFC 1071), for the kernel programs and, through
//! the host tests here, checked once: whole sums of headers a program builds
//! (`sum`, `finish`), and incremental updates (RFC 1624, eqn. 3:
//! HC' = ~(~HC + ~m + m')).
//!
//! Values are the raw 16/32-bit words as loaded from the packet: the one's
//! complement sum is independent of byte order, so no swapping is needed as
//! long as the checksum field is read and written the same way.
//!
//! These are for checksums that cover the whole packet. A packet carrying a
//! partial checksum (CHECKSUM_PARTIAL: only the pseudo-header sum is in the
//! field) needs the kernel's helpers instead, which only TC has.

/// Folds an incremental update's sum. Two folds suffice: the sums below
/// add at most five 16-bit words. (Not `finish`'s loop: in the kernel
/// programs that compiles to a loop the verifier walks at every update;
/// nor `finish` through this: the whole sums grow by about 170
/// instructions.)
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// One's complement sum of big-endian 16-bit words (`bytes` of even
/// length), for `finish`. Sums of several parts may be added first.
#[inline(always)]
pub fn sum(bytes: &[u8]) -> u32 {
    let mut total = 0u32;
    for pair in bytes.chunks_exact(2) {
        total += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    total
}

/// The checksum of a one's complement `sum`: folded to 16 bits and
/// complemented, to be written big-endian.
#[inline(always)]
pub fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The checksum after a 32-bit word of the covered data changed from `from` to `to`.
#[inline(always)]
pub fn replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum =
        (!check) as u32 + (!(from >> 16) & 0xffff) + (!from & 0xffff) + (to >> 16) + (to & 0xffff);
    !fold(sum)
}

/// The checksum after a 16-bit word of the covered data changed from `from` to `to`.
#[inline(always)]
pub fn replace2(check: u16, from: u16, to: u16) -> u16 {
    let sum = (!check) as u32 + (!from) as u32 + to as u32;
    !fold(sum)
}

/// An address as the 32-bit words a checksum covers: IPv4's one, IPv6's
/// four. Updates over it are written once for both families.
pub trait Words: Copy {
    fn words(&self) -> &[u32];
}

impl Words for u32 {
    #[inline(always)]
    fn words(&self) -> &[u32] {
        core::slice::from_ref(self)
    }
}

impl Words for [u32; 4] {
    #[inline(always)]
    fn words(&self) -> &[u32] {
        self
    }
}

/// The checksum after an address in the covered data changed from `from` to `to`.
#[inline(always)]
pub fn replace_addr<A: Words>(check: u16, from: &A, to: &A) -> u16 {
    let mut check = check;
    for (from, to) in from.words().iter().zip(to.words()) {
        check = replace4(check, *from, *to);
    }
    check
}

/// A UDP checksum of 0 means "none" and must stay 0; a computed 0 is sent as 0xffff.
#[inline(always)]
pub fn udp_fixup(old: u16, new: u16) -> u16 {
    if old == 0 {
        0
    } else if new == 0 {
        0xffff
    } else {
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Full checksum over 16-bit big-endian words, as a reference.
    fn full(words: &[u16]) -> u16 {
        let mut sum: u32 = 0;
        for w in words {
            sum += *w as u32;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn sum_and_finish_match_the_reference() {
        // An IPv4 header with its checksum field zeroed (RFC 1071's example
        // style): the result is the header's known checksum.
        let header: [u8; 20] = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00,
            0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        let words: [u16; 10] =
            core::array::from_fn(|i| u16::from_be_bytes([header[2 * i], header[2 * i + 1]]));
        assert_eq!(finish(sum(&header)), full(&words));
        assert_eq!(finish(sum(&header)), 0xb861);
        // With the checksum written in, the header sums to all ones.
        let mut checked = header;
        checked[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(finish(sum(&checked)), 0);
    }

    #[test]
    fn finish_folds_any_carry() {
        assert_eq!(finish(0), 0xffff);
        assert_eq!(finish(0xffff), 0);
        assert_eq!(finish(0x1_0000), 0xfffe);
        assert_eq!(finish(0x1_fffe), 0);
        assert_eq!(finish(u32::MAX), 0);
        // Sums of parts add up before finishing, as the programs do.
        let (a, b) = ([0xffu8, 0xff, 0x00, 0x01], [0x80u8, 0x00]);
        assert_eq!(finish(sum(&a) + sum(&b)), full(&[0xffff, 0x0001, 0x8000]));
    }

    #[test]
    fn replace4_matches_recomputation() {
        let mut words = [
            0x4500u16, 0x0073, 0x0000, 0x4000, 0x4011, 0, 0xc0a8, 0x0001, 0xc0a8, 0x00c7,
        ];
        let check = full(&words);
        let from = (words[8] as u32) << 16 | words[9] as u32;
        let to = 0x0a60_000a_u32;
        words[8] = (to >> 16) as u16;
        words[9] = to as u16;
        assert_eq!(replace4(check, from, to), full(&words));
    }

    #[test]
    fn replace2_matches_recomputation() {
        let mut words = [0x1234u16, 0x0050, 0xffff, 0x0001];
        let check = full(&words);
        words[1] = 0x1f90;
        assert_eq!(replace2(check, 0x0050, 0x1f90), full(&words));
    }

    #[test]
    fn replace_is_byte_order_independent() {
        let words = [0x1234u16, 0xabcd, 0x0f0f];
        let check = full(&words);
        let swapped: [u16; 3] = words.map(u16::swap_bytes);
        let check_sw = full(&swapped);
        assert_eq!(check.swap_bytes(), check_sw);
        let updated = replace2(check, 0xabcd, 0x0102);
        let updated_sw = replace2(check_sw, 0xcdab, 0x0201);
        assert_eq!(updated.swap_bytes(), updated_sw);
    }

    #[test]
    fn replace_addr_matches_recomputation() {
        let mut words = [
            0x6000u16, 0, 0x0011, 0x4000, 0xfd00, 0, 0, 0, 0, 0, 0, 0x0001, 0x1234,
        ];
        let check = full(&words);
        let word = |w: &[u16]| (w[0] as u32) << 16 | w[1] as u32;
        let from: [u32; 4] = core::array::from_fn(|i| word(&words[4 + 2 * i..]));
        let to = [0xfd00_0000, 0x0000_0001, 0x0000_0000, 0x0000_00c7];
        for (i, w) in to.iter().enumerate() {
            words[4 + 2 * i] = (w >> 16) as u16;
            words[5 + 2 * i] = *w as u16;
        }
        assert_eq!(replace_addr(check, &from, &to), full(&words));
        assert_eq!(
            replace_addr(check, &from[1], &to[1]),
            replace4(check, from[1], to[1])
        );
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_fixup(0, 0x1234), 0);
        assert_eq!(udp_fixup(0x1111, 0), 0xffff);
        assert_eq!(udp_fixup(0x1111, 0x2222), 0x2222);
    }
}
