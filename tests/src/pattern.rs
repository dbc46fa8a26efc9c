//! The deterministic byte stream `sluice-peer` sends and checks.
//!
//! Byte `i` comes from a splitmix64 (xorshift-multiply) hash of `i / 8`, so
//! every 8-byte block differs from its neighbours: loss, duplication or
//! reordering anywhere in a stream shows up as a mismatch at a known offset.

fn mix(block: u64) -> u64 {
    let mut z = block.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The byte at stream offset `offset`.
pub fn byte_at(offset: u64) -> u8 {
    mix(offset >> 3).to_le_bytes()[(offset & 7) as usize]
}

/// Fill `buf` with the stream starting at `offset`.
pub fn fill(offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = byte_at(offset + i as u64);
    }
}

/// Stream offset of the first byte of `buf` (which starts at `offset`) that
/// differs from the pattern.
pub fn first_mismatch(offset: u64, buf: &[u8]) -> Option<u64> {
    buf.iter().enumerate().find(|&(i, &b)| b != byte_at(offset + i as u64)).map(|(i, _)| offset + i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_swap_and_shift() {
        let mut buf = vec![0u8; 64];
        fill(100, &mut buf);
        assert_eq!(first_mismatch(100, &buf), None);
        buf.swap(20, 30);
        assert_eq!(first_mismatch(100, &buf), Some(120));
        // The same bytes one block later do not match.
        let mut shifted = vec![0u8; 8];
        fill(0, &mut shifted);
        assert_eq!(first_mismatch(8, &shifted), Some(8));
    }
}
