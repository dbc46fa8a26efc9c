//! The little DER we need by hand: wrapping PKCS#1 and SEC1 keys in PKCS#8
//! (ring, under rcgen, only reads PKCS#8) and writing a critical SAN
//! extension (rcgen always writes it non-critical). Full ASN.1 libraries are
//! in the tree, but these few shapes are simpler to read written out.

pub(crate) const TAG_INTEGER: u8 = 0x02;
pub(crate) const TAG_OCTET_STRING: u8 = 0x04;
pub(crate) const TAG_NULL: u8 = 0x05;
pub(crate) const TAG_OID: u8 = 0x06;
pub(crate) const TAG_SEQUENCE: u8 = 0x30;
/// GeneralName `uniformResourceIdentifier [6] IA5String`, implicitly tagged.
pub(crate) const TAG_GENERAL_NAME_URI: u8 = 0x86;

/// Encodes one tag-length-value.
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// Splits one tag-length-value off the front of `input`, returning
/// `(tag, content, rest)`. Only definite lengths are valid DER, so that is all
/// this accepts.
pub(crate) fn split_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// Like [`split_tlv`], but insists on `tag`.
pub(crate) fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    match split_tlv(input)? {
        (t, content, rest) if t == tag => Some((content, rest)),
        _ => None,
    }
}

/// Bit length of a DER INTEGER's content, ignoring sign padding.
pub(crate) fn integer_bits(content: &[u8]) -> usize {
    let digits: &[u8] = {
        let skip = content.iter().take_while(|b| **b == 0).count();
        &content[skip..]
    };
    match digits.first() {
        None => 0,
        Some(top) => digits.len() * 8 - top.leading_zeros() as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lengths_round_trip() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let content = vec![7u8; len];
            let encoded = tlv(TAG_OCTET_STRING, &content);
            let (tag, got, rest) = split_tlv(&encoded).expect("parses");
            assert_eq!((tag, got.len(), rest.len()), (TAG_OCTET_STRING, len, 0));
        }
    }

    #[test]
    fn truncated_input_is_rejected() {
        assert!(split_tlv(&[]).is_none());
        assert!(split_tlv(&[0x04]).is_none());
        assert!(split_tlv(&[0x04, 0x05, 1, 2]).is_none());
        assert!(split_tlv(&[0x04, 0x82, 0x01]).is_none());
        assert!(split_tlv(&[0x04, 0x80]).is_none());
    }

    #[test]
    fn integer_bits_ignores_padding() {
        assert_eq!(integer_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(integer_bits(&[0x01, 0x00]), 9);
        assert_eq!(integer_bits(&[0x00]), 0);
    }
}
