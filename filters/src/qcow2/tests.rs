//! Unit tests of the qcow2 format code.

use super::header::{fresh_image, Header};

#[test]
fn fresh_images_parse() {
    for (size, bits, pre) in [(1u64 << 30, 16, false), (5 << 20, 9, true), (1, 21, false)] {
        let (b, total) = fresh_image(size, bits, Some(("base.raw", "raw")), pre).unwrap();
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.size, size);
        assert_eq!(h.cluster_bits, bits);
        assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
        assert_eq!(h.backing_format.as_deref(), Some("raw"));
        assert!(total >= b.len() as u64);
        assert!(total.is_multiple_of(1 << bits));
    }
}

#[test]
fn bad_headers_are_refused() {
    let (mut b, _) = fresh_image(1 << 20, 16, None, false).unwrap();
    b[79] |= 1 << 2; // external data file
    let e = Header::parse(&b).unwrap_err();
    assert!(e.msg.contains("external data file"), "{}", e.msg);
    b[79] = 1 << 7; // unknown
    assert!(Header::parse(&b).unwrap_err().msg.contains("incompatible"));
    b[79] = 0;
    b[0] = b'X';
    assert!(Header::parse(&b).unwrap_err().msg.contains("magic"));
}
