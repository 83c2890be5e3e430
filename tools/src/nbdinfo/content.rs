//! Content detection for `nbdinfo --content`: describe the first
//! sectors of an export the way `file -b` (file 5.44, as run by libnbd's
//! nbdinfo) describes them, without running `file`.
//!
//! libnbd's nbdinfo reads the first `min(size, 8192)` bytes
//! ([`PROBE_SIZE`]) and prints what file(1) says about them. We
//! recognise the formats a disk image usually starts with, and print
//! the same string `file` prints for them, so `nbdinfo --json` output
//! compares equal:
//!
//! | content                         | example description |
//! |---------------------------------|---------------------|
//! | nothing (size 0)                | `empty` |
//! | MBR partition table             | `DOS/MBR boot sector; partition 1 : ID=0x83, start-CHS (0x0,32,33), end-CHS (0x8,40,32), startsector 2048, 129024 sectors` |
//! | GPT (its protective MBR)        | `DOS/MBR boot sector; partition 1 : ID=0xee, ..., extended partition table (last)` |
//! | qcow2                           | `QEMU QCOW Image (v3), 67108864 bytes, ...` |
//! | ext2/3/4                        | `Linux rev 1.0 ext4 filesystem data, UUID=..., volume name "x" (extents) (64bit) (large files) (huge files)` |
//! | XFS                             | `SGI XFS filesystem data (blksz 4096, inosz 512, v2 dirs)` |
//! | Linux swap                      | `Linux swap file, 4k page size, little endian, version 1, ...` |
//! | ISO 9660 (needs 38K of data)    | `ISO 9660 CD-ROM filesystem data 'LABEL'` |
//! | text                            | `ASCII text`, `Unicode text, UTF-8 text`, ... |
//! | zeroes, anything else           | `data` |
//!
//! The rules follow file's magic database entry by entry for these
//! formats, quirks included (qcow2 images are described twice, CHS
//! cylinders printed as file prints them). Note that an ISO 9660 image
//! is `data` to nbdinfo, ours and libnbd's alike: its volume descriptor
//! is at 32K, beyond the 8K that are probed. Boot-loader signatures
//! inside an MBR and FAT/NTFS boot sectors are not decoded (file names
//! the boot loader; we describe only the partition table).

/// How many bytes from the start of the export are described.
pub const PROBE_SIZE: u64 = 8192;

/// Describe `buf` (the first bytes of an export) like `file -b`.
pub fn describe(buf: &[u8]) -> String {
    if buf.is_empty() {
        return "empty".into();
    }
    if buf.len() == 1 {
        return "very short file (no magic)".into();
    }
    // In file's order of precedence ("strength").
    let detectors: [fn(&Bytes) -> Option<String>; 6] = [swap, iso9660, mbr, xfs, qcow, ext];
    let b = Bytes(buf);
    for d in detectors {
        if let Some(s) = d(&b) {
            return s;
        }
    }
    text(buf).unwrap_or_else(|| "data".into())
}

/// Bounds-checked reads: a rule whose bytes are missing does not match.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn get<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        self.0.get(off..off.checked_add(N)?)?.try_into().ok()
    }
    fn u8(&self, off: usize) -> Option<u8> {
        self.0.get(off).copied()
    }
    fn le16(&self, off: usize) -> Option<u16> {
        self.get(off).map(u16::from_le_bytes)
    }
    fn be16(&self, off: usize) -> Option<u16> {
        self.get(off).map(u16::from_be_bytes)
    }
    fn le32(&self, off: usize) -> Option<u32> {
        self.get(off).map(u32::from_le_bytes)
    }
    fn be32(&self, off: usize) -> Option<u32> {
        self.get(off).map(u32::from_be_bytes)
    }
    fn be64(&self, off: usize) -> Option<u64> {
        self.get(off).map(u64::from_be_bytes)
    }
    /// Do the bytes at `off` equal `s`?
    fn is(&self, off: usize, s: &[u8]) -> Option<bool> {
        Some(self.0.get(off..off.checked_add(s.len())?)? == s)
    }
    /// A NUL-terminated string at `off` as file prints it with `%s`:
    /// at most 127 bytes, non-printable bytes as `\ooo`.
    fn cstr(&self, off: usize) -> Option<String> {
        let rest = self.0.get(off..)?;
        let rest = &rest[..rest.len().min(127)];
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        Some(printable(&rest[..end]))
    }
}

/// file's `file_printable`: printable ASCII as is, the rest as `\ooo`.
fn printable(s: &[u8]) -> String {
    let mut out = String::new();
    for &c in s {
        if (0x20..0x7f).contains(&c) {
            out.push(c as char);
        } else {
            out.push_str(&format!("\\{:03o}", c));
        }
    }
    out
}

/// A description being built the way file joins the descriptions of
/// the rules that matched: with a space, unless the rule starts with
/// `\b` ([`Out::glue`]).
struct Out(String);

impl Out {
    fn new(first: &str) -> Out {
        Out(first.to_string())
    }
    /// Append with a separating space.
    fn add(&mut self, s: &str) {
        if !s.is_empty() {
            if !self.0.is_empty() {
                self.0.push(' ');
            }
            self.0.push_str(s);
        }
    }
    /// Append without a space (`\b` in the magic file).
    fn glue(&mut self, s: &str) {
        self.0.push_str(s);
    }
}

/// A UUID stored big-endian, as `%08x-%04x-%04x-%04x-%08x%04x`.
fn uuid(b: &Bytes, off: usize) -> Option<String> {
    Some(format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:08x}{:04x}",
        b.be32(off)?,
        b.be16(off + 4)?,
        b.be16(off + 6)?,
        b.be16(off + 8)?,
        b.be32(off + 10)?,
        b.be16(off + 14)?
    ))
}

/// Linux swap, 4K pages: `SWAPSPACE2` at the end of the first page.
fn swap(b: &Bytes) -> Option<String> {
    if !b.is(4086, b"SWAPSPACE2")? {
        return None;
    }
    let mut o = Out::new("Linux swap file, 4k page size,");
    if b.le32(1024) == Some(1) {
        o.add("little endian, version 1,");
        if let Some(n) = b.le32(1028) {
            o.add(&format!("size {n} pages,"));
        }
        if let Some(n) = b.le32(1032) {
            o.add(&format!("{n} bad pages,"));
        }
    }
    if b.be32(1024) == Some(1) {
        o.add("big endian, version 1,");
        if let Some(n) = b.be32(1028) {
            o.add(&format!("size {n} pages,"));
        }
        if let Some(n) = b.be32(1032) {
            o.add(&format!("{n} bad pages,"));
        }
    }
    match b.cstr(1052) {
        Some(l) if l.is_empty() => o.add("no label,"),
        Some(l) => o.add(&format!("LABEL={l},")),
        None => {}
    }
    if let Some(u) = b.be32(1036) {
        o.add(&format!("UUID={u:08x}"));
        for (off, len) in [(1040, 4), (1042, 4), (1044, 4), (1046, 8)] {
            let v = if len == 4 {
                b.be16(off).map(u32::from)
            } else {
                b.be32(off)
            };
            if let Some(v) = v {
                o.glue(&format!("-{v:0len$x}"));
            }
        }
        if let Some(v) = b.be16(1050) {
            o.glue(&format!("{v:04x}"));
        }
    }
    Some(o.0)
}

/// ISO 9660 (or UDF): the primary volume descriptor at 32K.
fn iso9660(b: &Bytes) -> Option<String> {
    if !b.is(32769, b"CD001")? {
        return None;
    }
    let mut o = Out::new("");
    match b.is(38913, b"NSR0") {
        Some(false) => o.add("ISO 9660 CD-ROM filesystem data"),
        Some(true) => {
            o.add("UDF filesystem data");
            match b.u8(38917) {
                Some(b'1') => o.add("(version 1.0)"),
                Some(b'2') => o.add("(version 1.5)"),
                Some(b'3') => o.add("(version 2.0)"),
                Some(v) => o.add(&format!("(unknown version, ID {v:#X})")),
                None => {}
            }
        }
        None => {}
    }
    if b.le16(510) == Some(0xaa55) {
        o.add("(DOS/MBR boot sector)");
    }
    if let Some(raw) = b.get::<32>(32808) {
        if raw[0] != 0 {
            let end = raw.iter().position(|&c| c == 0).unwrap_or(32);
            let label = printable(&raw[..end]);
            o.add(&format!("'{}'", label.trim()));
        }
    }
    if b.is(34816, b"\0CD001\x01EL TORITO SPECIFICATION") == Some(true) {
        o.add("(bootable)");
    }
    Some(o.0)
}

/// `0x` + cylinder + `,head,sector` of a CHS address, as file's magic
/// prints it (the two high bits of the cylinder as a digit in front of
/// the low byte printed with `%x`).
fn chs(b: &Bytes, q: usize) -> Option<String> {
    let (head, sc, cyl) = (b.u8(q)?, b.u8(q + 1)?, b.u8(q + 2)?);
    let high = match sc & 0xc0 {
        0x40 => "1",
        0x80 => "2",
        0xc0 => "3",
        _ => "",
    };
    Some(format!("0x{high}{cyl:x},{head},{}", sc & 0x3f))
}

/// One MBR partition entry at `p` (type not 0, boot flag 0 or >= 0x80).
fn partition_entry(b: &Bytes, p: usize, o: &mut Out) -> Option<()> {
    let typ = b.u8(p + 4)?;
    let flag = b.u8(p)?;
    if typ == 0 || (flag != 0 && flag <= 0x7f) {
        return Some(());
    }
    o.glue("; partition");
    // The entry's number, from where the boot signature is relative to it.
    for (rel, n) in [(64, "1"), (48, "2"), (32, "3"), (16, "4")] {
        if b.le16(p + rel) == Some(0xaa55) {
            o.add(n);
        }
    }
    o.add(&format!(": ID={typ:#x}"));
    if flag & 0x80 != 0 {
        o.glue(", active");
    }
    if flag > 0x80 {
        o.add(&format!("{flag:#x}"));
    }
    o.glue(", start-CHS (");
    o.glue(&chs(b, p + 1)?);
    o.glue("), end-CHS (");
    o.glue(&chs(b, p + 5)?);
    o.glue(&format!("), startsector {}", b.le32(p + 8)?));
    o.glue(&format!(", {} sectors", b.le32(p + 12)?));
    Some(())
}

/// A DOS/MBR boot sector with its partition table (GPT disks have a
/// protective one).
fn mbr(b: &Bytes) -> Option<String> {
    if b.le16(510)? != 0xaa55 {
        return None;
    }
    let mut o = Out::new("DOS/MBR boot sector");
    if mbr_shows_table(b) == Some(true) {
        for i in 0..4 {
            // A cut-off entry ends the table, as in file.
            if partition_entry(b, 446 + 16 * i, &mut o).is_none() {
                break;
            }
        }
    }
    // Only the first two entries used, the second of which is an
    // extended partition (or nothing, as in a protective MBR).
    if b.u8(3) == Some(0)
        && b.u8(446) == Some(0)
        && b.u8(450).is_some_and(|t| t > 0)
        && b.u8(482) == Some(0)
        && b.u8(498) == Some(0)
    {
        match b.u8(466) {
            Some(5) => o.glue(", extended partition table"),
            Some(0xf) => o.glue(", extended partition table (LBA)"),
            Some(0) => o.glue(", extended partition table (last)"),
            _ => {}
        }
    }
    if b.le32(512) == Some(0x8256_4557) {
        o.glue(", BSD disklabel");
    }
    Some(o.0)
}

/// Whether file goes on to print the partition table: not for boot
/// sectors it recognises as something else (Linux kernels, BeOS, FAT
/// boot code...).
fn mbr_shows_table(b: &Bytes) -> Option<bool> {
    if b.is(3, b"IHISK")?
        || b.be32(0)? == 0xb8c0_078e
        || b.is(514, b"HdrS")?
        || b.is(422, b"Be Boot Loader")?
    {
        return Some(false);
    }
    if b.be32(0)? & 0xfd00_0000 == 0xe900_0000 {
        // A jump: only the common boot code that starts with
        // cli; xor ax,ax; mov ds/es,ax.
        let target = usize::from(b.u8(1)?) + 2;
        return Some(b.be64(target)? == 0xfa31_c08e_d88e_c08e);
    }
    if b.is(0, b"RRaA")?
        || b.be64(0)? == 0xfa66_0fb6_4610_668b
        || b.be64(0)? == 0x660f_b646_1066_8b4e
        || b.is(0, b"\r\n")?
    {
        return Some(false);
    }
    let flag = b.u8(446)?;
    Some(flag == 0 || flag > 0x7f)
}

/// XFS superblock.
fn xfs(b: &Bytes) -> Option<String> {
    if !b.is(0, b"XFSB")? {
        return None;
    }
    let mut o = Out::new("SGI XFS filesystem data");
    if let Some(v) = b.be32(4) {
        o.add(&format!("(blksz {},", v as i32));
    }
    if let Some(v) = b.be16(104) {
        o.add(&format!("inosz {},", v as i16));
    }
    if let Some(v) = b.be16(100) {
        if v & 0x2004 != 0x2004 {
            o.add("v1 dirs)");
        } else {
            o.add("v2 dirs)");
        }
    }
    Some(o.0)
}

/// asctime() of a UTC time, without the newline.
fn asctime_utc(t: i64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    // Civil date from days since the epoch (Howard Hinnant's method).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{} {}{:3} {:02}:{:02}:{:02} {}",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        day,
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        year
    )
}

/// QEMU qcow and qcow2. file's magic applies the qcow v1 layout to
/// every version and then the v2/v3 layout to those, so a qcow2 image
/// is described twice, the first time with v1 field offsets (an
/// `l1_size` of 1 reads as "AES-encrypted"). We print what file prints.
fn qcow(b: &Bytes) -> Option<String> {
    if !b.is(0, b"QFI\xfb")? {
        return None;
    }
    let mut o = Out::new("QEMU QCOW Image");
    let version = b.be32(4)? as i32;
    o.add(&format!("(v{version})"));
    if b.be32(12).is_some_and(|v| (v as i32) > 0) {
        o.glue(", has backing file (");
        let off = b.be32(12)? as usize;
        if let Some(path) = b.cstr(off).filter(|p| !p.is_empty()) {
            o.glue(&format!("path {path}"));
            match b.be32(20) {
                Some(t) if (t as i32) > 0 => {
                    o.glue(&format!(", mtime {})", asctime_utc(i64::from(t as i32))))
                }
                Some(_) => o.glue(")"),
                None => {}
            }
        }
    }
    if let Some(size) = b.be64(24) {
        o.glue(&format!(", {} bytes", size as i64));
    }
    if b.be32(36) == Some(1) {
        o.glue(", AES-encrypted");
    }
    if version == 2 || version == 3 {
        o.add(&format!("(v{version})"));
        if b.be64(8).is_some_and(|v| (v as i64) > 0) {
            o.glue(", has backing file");
            let off = b.be32(12)? as usize;
            if let Some(path) = b.cstr(off).filter(|p| !p.is_empty()) {
                o.add(&format!("(path {path})"));
            }
        }
        if let Some(size) = b.be64(24) {
            o.glue(&format!(", {} bytes", size as i64));
        }
        if b.be32(32) == Some(1) {
            o.glue(", AES-encrypted");
        }
    }
    Some(o.0)
}

/// ext2, ext3, ext4: the superblock at 1024.
fn ext(b: &Bytes) -> Option<String> {
    if b.le16(1080)? != 0xef53 {
        return None;
    }
    let mut o = Out::new("Linux");
    if let Some(rev) = b.le32(1100) {
        o.add(&format!("rev {}", rev as i32));
    }
    if let Some(minor) = b.le16(1086) {
        o.glue(&format!(".{}", minor as i16));
    }
    let compat = b.le32(1116);
    let incompat = b.le32(1120);
    let ro_compat = b.le32(1124);
    match compat {
        Some(c) if c & 4 == 0 => {
            o.add("ext2 filesystem data");
            if b.le16(1082).is_some_and(|s| s & 1 == 0) {
                o.add("(mounted or unclean)");
            }
        }
        Some(_) => {
            // Signed comparisons, as in the magic file.
            if let Some(i) = incompat.map(|i| i as i32) {
                if i < 0x40 {
                    match ro_compat.map(|r| r as i32) {
                        Some(r) if r < 8 => o.add("ext3 filesystem data"),
                        Some(_) => o.add("ext4 filesystem data"),
                        None => {}
                    }
                } else {
                    o.add("ext4 filesystem data");
                }
            }
        }
        None => {}
    }
    if let Some(u) = uuid(b, 1128) {
        o.glue(&format!(", UUID={u}"));
    }
    if let Some(name) = b.u8(1144).filter(|&c| c > b'0').and(b.cstr(1144)) {
        o.glue(&format!(", volume name \"{name}\""));
    }
    let has = |v: Option<u32>, bit: u32| v.is_some_and(|v| v & bit != 0);
    if has(incompat, 4) {
        o.add("(needs journal recovery)");
    }
    if b.le16(1082).is_some_and(|s| s & 2 != 0) {
        o.add("(errors)");
    }
    for (bit, what) in [(1, "(compressed)"), (0x40, "(extents)"), (0x80, "(64bit)")] {
        if has(incompat, bit) {
            o.add(what);
        }
    }
    for (bit, what) in [(2, "(large files)"), (8, "(huge files)")] {
        if has(ro_compat, bit) {
            o.add(what);
        }
    }
    Some(o.0)
}

/// `buf` as UTF-8, allowing a sequence cut off at the end (the probe
/// may end in the middle of a character).
fn utf8_prefix(buf: &[u8]) -> Option<&str> {
    match std::str::from_utf8(buf) {
        Ok(s) => Some(s),
        Err(e) if e.error_len().is_none() => std::str::from_utf8(&buf[..e.valid_up_to()]).ok(),
        Err(_) => None,
    }
}

/// Plain text, as file's encoding and ascmagic checks describe it.
fn text(buf: &[u8]) -> Option<String> {
    // Trailing NULs are not part of the text, except that an evenly
    // sized buffer is not cut at an odd length (for UTF-16).
    let mut len = buf.len();
    while len > 1 && buf[len - 1] == 0 {
        len -= 1;
    }
    if len % 2 == 1 && buf.len().is_multiple_of(2) {
        len += 1;
    }
    let buf = &buf[..len];
    // BEL BS HT LF VT FF CR ESC NEL and printable ASCII.
    let plain = |c: u32| (7..=13).contains(&c) || c == 27 || c == 0x85 || (0x20..0x7f).contains(&c);
    let bytes = || buf.iter().map(|&c| u32::from(c));
    let (kind, chars): (&str, Vec<u32>) = if bytes().all(plain) {
        ("ASCII text", bytes().collect())
    } else if let Some(s) =
        utf8_prefix(buf).filter(|s| s.chars().all(|c| !c.is_ascii() || plain(c as u32)))
    {
        (
            "Unicode text, UTF-8 text",
            s.chars().map(u32::from).collect(),
        )
    } else if bytes().all(|c| plain(c) || c >= 0xa0) {
        ("ISO-8859 text", bytes().collect())
    } else if bytes().all(|c| plain(c) || c >= 0x80) {
        ("Non-ISO extended-ASCII text", bytes().collect())
    } else {
        return None;
    };
    const MAXLINELEN: usize = 300;
    let (mut crlf, mut cr, mut lf, mut nel) = (0, 0, 0, 0);
    let mut seen_cr = false;
    // Index of the last line end, -1 before the first.
    let mut last_end: isize = -1;
    let mut longest = 0usize;
    let (mut escapes, mut backspaces) = (false, false);
    for (i, &c) in chars.iter().enumerate() {
        if c == u32::from(b'\n') {
            if seen_cr {
                crlf += 1;
            } else {
                lf += 1;
            }
            last_end = i as isize;
        } else if seen_cr {
            cr += 1;
        }
        seen_cr = c == u32::from(b'\r');
        if seen_cr {
            last_end = i as isize;
        }
        if c == 0x85 {
            nel += 1;
            last_end = i as isize;
        }
        if i as isize > last_end + MAXLINELEN as isize {
            longest = longest.max((i as isize - last_end) as usize);
        }
        escapes |= c == 0x1b;
        backspaces |= c == 0x08;
    }
    if seen_cr {
        cr += 1;
    }
    let mut out = kind.to_string();
    if longest > 0 {
        out.push_str(&format!(", with very long lines ({longest})"));
    }
    if crlf + cr + lf + nel == 0 {
        out.push_str(", with no line terminators");
    } else if crlf + cr + nel > 0 {
        let kinds: Vec<&str> = [(crlf, "CRLF"), (cr, "CR"), (lf, "LF"), (nel, "NEL")]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(_, k)| *k)
            .collect();
        out.push_str(&format!(", with {} line terminators", kinds.join(", ")));
    }
    if escapes {
        out.push_str(", with escape sequences");
    }
    if backspaces {
        out.push_str(", with overstriking");
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr_image() -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[510] = 0x55;
        b[511] = 0xaa;
        // Partition 1: Linux, active, CHS (0,32,33)..(8,40,32), 2048+129024.
        b[446..462].copy_from_slice(&[
            0x80, 32, 33, 0, 0x83, 40, 32, 8, 0x00, 0x08, 0, 0, 0x00, 0xf8, 0x01, 0,
        ]);
        b
    }

    #[test]
    fn trivial() {
        assert_eq!(describe(&[]), "empty");
        assert_eq!(describe(&[0]), "very short file (no magic)");
        assert_eq!(describe(&[0; 8192]), "data");
        assert_eq!(describe(b"hello"), "ASCII text, with no line terminators");
        assert_eq!(describe(b"hello\n"), "ASCII text");
        assert_eq!(
            describe(b"a\r\nb\r\n"),
            "ASCII text, with CRLF line terminators"
        );
        assert_eq!(describe(b"a\rb\r"), "ASCII text, with CR line terminators");
        assert_eq!(
            describe(b"a\nb\r\nc"),
            "ASCII text, with CRLF, LF line terminators"
        );
        assert_eq!(
            describe("h\u{e9}llo\n".as_bytes()),
            "Unicode text, UTF-8 text"
        );
        assert_eq!(describe(b"\xe9t\xe9\n"), "ISO-8859 text");
        assert_eq!(
            describe(b"a\x1b[1mb\n"),
            "ASCII text, with escape sequences"
        );
        assert_eq!(describe(b"a\x08b\n"), "ASCII text, with overstriking");
        assert_eq!(
            describe(b"a\x85b\n"),
            "ASCII text, with LF, NEL line terminators"
        );
        assert_eq!(describe(b"a\x80b\n"), "Non-ISO extended-ASCII text");
        assert_eq!(describe(b"a\x7fb\n"), "data");
        assert_eq!(describe(b"abc\r"), "ASCII text, with CR line terminators");
        assert_eq!(describe(b"hello\n\0"), "ASCII text");
        assert_eq!(describe(b"hello\0"), "data");
        let mut padded = vec![0u8; 8192];
        padded[..6].copy_from_slice(b"hello\n");
        assert_eq!(describe(&padded), "ASCII text");
        padded[5] = b'!';
        padded[6] = b'\n';
        assert_eq!(describe(&padded), "data");
        let long = [b'x'; 400];
        assert_eq!(
            describe(&[&long[..], b"\n"].concat()),
            "ASCII text, with very long lines (400)"
        );
        assert_eq!(
            describe(&[b'a'; 8192]),
            "ASCII text, with very long lines (8192), with no line terminators"
        );
    }

    #[test]
    fn mbr_partitions() {
        let b = mbr_image();
        assert_eq!(
            describe(&b),
            "DOS/MBR boot sector; partition 1 : ID=0x83, active, start-CHS (0x0,32,33), \
             end-CHS (0x8,40,32), startsector 2048, 129024 sectors"
        );
        let mut only_sig = vec![0u8; 8192];
        only_sig[510] = 0x55;
        only_sig[511] = 0xaa;
        assert_eq!(describe(&only_sig), "DOS/MBR boot sector");
    }

    #[test]
    fn gpt_protective_mbr() {
        let mut b = vec![0u8; 8192];
        b[510] = 0x55;
        b[511] = 0xaa;
        b[446..462].copy_from_slice(&[
            0, 0, 2, 0, 0xee, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0xff, 0xff, 0x01, 0,
        ]);
        assert_eq!(
            describe(&b),
            "DOS/MBR boot sector; partition 1 : ID=0xee, start-CHS (0x0,0,2), \
             end-CHS (0x3ff,255,63), startsector 1, 131071 sectors, extended partition table (last)"
        );
    }

    #[test]
    fn qcow2() {
        let mut b = vec![0u8; 8192];
        b[..4].copy_from_slice(b"QFI\xfb");
        b[7] = 3; // version
        b[23] = 16; // cluster bits
        b[24..32].copy_from_slice(&(64u64 << 20).to_be_bytes());
        b[39] = 1; // l1_size
        assert_eq!(
            describe(&b),
            "QEMU QCOW Image (v3), 67108864 bytes, AES-encrypted (v3), 67108864 bytes"
        );
        // With a backing file.
        b[8..16].copy_from_slice(&0x200u64.to_be_bytes());
        b[0x200..0x208].copy_from_slice(b"q.qcow2\0");
        b[16..20].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            describe(&b),
            "QEMU QCOW Image (v3), has backing file (path q.qcow2, mtime Thu Jan  1 00:00:16 1970), \
             67108864 bytes, AES-encrypted (v3), has backing file (path q.qcow2), 67108864 bytes"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(asctime_utc(16), "Thu Jan  1 00:00:16 1970");
        assert_eq!(asctime_utc(1_700_000_000), "Tue Nov 14 22:13:20 2023");
        assert_eq!(asctime_utc(951_782_400), "Tue Feb 29 00:00:00 2000");
    }

    #[test]
    fn xfs_and_ext() {
        let mut b = vec![0u8; 8192];
        b[..4].copy_from_slice(b"XFSB");
        b[4..8].copy_from_slice(&4096u32.to_be_bytes());
        b[100..102].copy_from_slice(&0xb4a5u16.to_be_bytes());
        b[104..106].copy_from_slice(&512u16.to_be_bytes());
        assert_eq!(
            describe(&b),
            "SGI XFS filesystem data (blksz 4096, inosz 512, v2 dirs)"
        );

        let mut b = vec![0u8; 8192];
        b[1080..1082].copy_from_slice(&0xef53u16.to_le_bytes());
        b[1082] = 1; // clean
        b[1100] = 1; // rev 1
        b[1116] = 0x3c; // has_journal among others
        b[1120..1124].copy_from_slice(&0x2c2u32.to_le_bytes());
        b[1124..1128].copy_from_slice(&0x46bu32.to_le_bytes());
        b[1128..1144].copy_from_slice(&[
            0x24, 0xc2, 0xbb, 0x85, 0x67, 0xa0, 0x4c, 0xeb, 0xbe, 0xe7, 0xc6, 0xc4, 0x1a, 0xd8,
            0x78, 0xb7,
        ]);
        b[1144..1149].copy_from_slice(b"myvol");
        assert_eq!(
            describe(&b),
            "Linux rev 1.0 ext4 filesystem data, UUID=24c2bb85-67a0-4ceb-bee7-c6c41ad878b7, \
             volume name \"myvol\" (extents) (64bit) (large files) (huge files)"
        );
        b[1116] = 0x38; // no journal: file calls it ext2
        b[1144] = 0;
        assert_eq!(
            describe(&b),
            "Linux rev 1.0 ext2 filesystem data, UUID=24c2bb85-67a0-4ceb-bee7-c6c41ad878b7 \
             (extents) (64bit) (large files) (huge files)"
        );
    }
}
