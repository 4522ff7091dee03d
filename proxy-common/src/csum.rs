//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Values are the raw 16/32-bit words as loaded from the packet: the one's
//! complement sum is independent of byte order, so no swapping is needed as
//! long as the checksum field is read and written the same way.
//!
//! These are for checksums that cover the whole packet. A packet carrying a
//! partial checksum (CHECKSUM_PARTIAL: only the pseudo-header sum is in the
//! field) needs the kernel's helpers instead, which only TC has.

#[inline(always)]
fn fold(sum: u32) -> u16 {
    // Two folds suffice: the sums below add at most five 16-bit words.
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
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
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_fixup(0, 0x1234), 0);
        assert_eq!(udp_fixup(0x1111, 0), 0xffff);
        assert_eq!(udp_fixup(0x1111, 0x2222), 0x2222);
    }
}
