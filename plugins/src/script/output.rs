//! What the methods print on stdout, parsed as nbdkit-sh-plugin(3)
//! describes (and, where it is silent, as nbdkit 1.32 reads it).

use libnbd::protocol::{alloc, errno};
use libnbd::{parse_size, BlockSize, Cache, Error, ExportEntry, Extents, Fua, Result, ThreadModel};

/// Output as text with one final newline removed (the handle of `open`,
/// the description of `export_description`, ...).
pub fn chomp(out: &[u8]) -> String {
    let out = out.strip_suffix(b"\n").unwrap_or(out);
    String::from_utf8_lossy(out).into_owned()
}

/// The complete lines of the output (a last line with no newline is not
/// one, as nbdkit reads lists).
pub fn lines(out: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(out);
    let mut v: Vec<String> = text.split('\n').map(str::to_string).collect();
    v.pop();
    v
}

/// An export list (`list_exports`, `default_export`): a first line
/// `NAMES`, `INTERLEAVED` or `NAMES+DESCRIPTIONS` says how the rest
/// reads; any other first line is the first name of a `NAMES` list.
pub fn exports(out: &[u8]) -> Vec<ExportEntry> {
    let lines = lines(out);
    let entry = |name: &String, description: Option<&String>| ExportEntry {
        name: name.clone(),
        description: description.cloned(),
    };
    match lines.first().map(String::as_str) {
        None => Vec::new(),
        Some("INTERLEAVED") => lines[1..]
            .chunks(2)
            .map(|p| entry(&p[0], p.get(1)))
            .collect(),
        Some("NAMES+DESCRIPTIONS") => {
            let rest = &lines[1..];
            let (names, descriptions) = rest.split_at(rest.len().div_ceil(2));
            names
                .iter()
                .enumerate()
                .map(|(i, n)| entry(n, descriptions.get(i)))
                .collect()
        }
        Some("NAMES") => lines[1..].iter().map(|n| entry(n, None)).collect(),
        Some(_) => lines.iter().map(|n| entry(n, None)).collect(),
    }
}

/// A size as `get_size` prints it: bytes or nbdkit's size syntax.
pub fn size(out: &[u8]) -> Option<u64> {
    parse_size(&chomp(out)).ok()
}

/// The answer of `can_fua`.
pub fn fua(out: &[u8]) -> Option<Fua> {
    match chomp(out).trim().to_ascii_lowercase().as_str() {
        "none" => Some(Fua::None),
        "emulate" => Some(Fua::Emulate),
        "native" => Some(Fua::Native),
        _ => None,
    }
}

/// The answer of `can_cache`.
pub fn cache(out: &[u8]) -> Option<Cache> {
    match chomp(out).trim().to_ascii_lowercase().as_str() {
        "none" => Some(Cache::None),
        "emulate" => Some(Cache::Emulate),
        "native" => Some(Cache::Native),
        _ => None,
    }
}

/// The answer of `thread_model` (anything else is ignored).
pub fn thread_model(out: &[u8]) -> Option<ThreadModel> {
    match chomp(out).trim() {
        "serialize_connections" => Some(ThreadModel::SerializeConnections),
        "serialize_all_requests" => Some(ThreadModel::SerializeAllRequests),
        "serialize_requests" => Some(ThreadModel::SerializeRequests),
        "parallel" => Some(ThreadModel::Parallel),
        _ => None,
    }
}

/// The answer of `block_size`: minimum, preferred and maximum, separated
/// by whitespace, each in nbdkit's size syntax. `Ok(None)` for `0 0 0`
/// (no constraints); `Err` names what is wrong.
pub fn block_size(out: &[u8]) -> Result<Option<BlockSize>, String> {
    let text = String::from_utf8_lossy(out);
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    let [min, pref, max] = words[..] else {
        return Err("block_size method cannot be parsed".into());
    };
    let parse = |w: &str| {
        parse_size(w)
            .ok()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| "block_size method cannot be parsed".to_string())
    };
    let (minimum, preferred, maximum) = (parse(min)?, parse(pref)?, parse(max)?);
    if (minimum, preferred, maximum) == (0, 0, 0) {
        return Ok(None);
    }
    let ok = minimum.is_power_of_two()
        && minimum <= 65536
        && preferred.is_power_of_two()
        && preferred >= minimum
        && maximum >= preferred
        && (maximum == u32::MAX || maximum % minimum == 0);
    if !ok {
        return Err(format!(
            "block_size method returned invalid sizes: minimum {minimum}, preferred {preferred}, maximum {maximum}"
        ));
    }
    Ok(Some(BlockSize {
        minimum,
        preferred,
        maximum,
    }))
}

/// The lines `offset length [type]` of `extents` into `ext`. The type is
/// a number, missing (0: data), or comma-separated words of which `hole`
/// and `zero` count. As nbdkit: the first extent must start at or before
/// the range asked for, each next where the last ended, and at least one
/// is needed.
pub fn extents(out: &[u8], ext: &mut Extents) -> Result<()> {
    let mut expected: Option<u64> = None;
    for line in lines(out) {
        if ext.is_full() {
            // What follows the range asked for is not looked at.
            break;
        }
        let words: Vec<&str> = line.split_ascii_whitespace().collect();
        if words.len() < 2 {
            return Err(Error::eio(format!("extents: cannot parse {line}")));
        }
        let num = |w: &str| {
            parse_size(w).map_err(|_| Error::eio(format!("could not parse size string ({w})")))
        };
        let (offset, length) = (num(words[0])?, num(words[1])?);
        let flags = match words.get(2) {
            None => 0,
            Some(t) if t.starts_with(|c: char| c.is_ascii_digit()) => t
                .parse::<u32>()
                .map_err(|_| Error::eio(format!("extents: cannot parse type {t}")))?,
            Some(t) => t.split(',').fold(0, |f, w| match w {
                "hole" => f | alloc::HOLE,
                "zero" => f | alloc::ZERO,
                _ => f,
            }),
        };
        if length == 0 {
            continue;
        }
        match expected {
            None if offset > ext.start() => {
                return Err(Error::einval(format!(
                    "extents: first extent must not be > start ({})",
                    ext.start()
                )))
            }
            Some(e) if e != offset => {
                return Err(Error::einval(
                    "extents: extents must be added in ascending order and must be contiguous",
                ))
            }
            _ => {}
        }
        expected = Some(offset.saturating_add(length));
        ext.add(offset, length, flags)?;
    }
    if expected.is_none() {
        return Err(Error::new(
            errno::EINVAL,
            "extents: plugin must return at least one extent",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::backend::HOLE_ZERO;
    use libnbd::Extent;

    #[test]
    fn text_and_lines() {
        assert_eq!(chomp(b"h-1\n\n"), "h-1\n");
        assert_eq!(chomp(b"abc"), "abc");
        assert_eq!(lines(b"a\nb\n"), ["a", "b"]);
        assert_eq!(lines(b"a\nb"), ["a"]);
        assert_eq!(lines(b""), Vec::<String>::new());
        assert_eq!(lines(b"\n"), [""]);
    }

    fn names(out: &str) -> Vec<(String, Option<String>)> {
        exports(out.as_bytes())
            .into_iter()
            .map(|e| (e.name, e.description))
            .collect()
    }

    #[test]
    fn export_lists() {
        let n = |s: &str| (s.to_string(), None);
        let d = |s: &str, t: &str| (s.to_string(), Some(t.to_string()));
        assert_eq!(names("a\nb\n"), [n("a"), n("b")]);
        assert_eq!(names("NAMES\na\nb\n"), [n("a"), n("b")]);
        assert_eq!(names("NAMES\n"), []);
        assert_eq!(names(""), []);
        assert_eq!(names("x"), []);
        assert_eq!(
            names("INTERLEAVED\na\ndesc a\nb\ndesc b\n"),
            [d("a", "desc a"), d("b", "desc b")]
        );
        assert_eq!(names("INTERLEAVED\na\nda\nb\n"), [d("a", "da"), n("b")]);
        assert_eq!(
            names("NAMES+DESCRIPTIONS\na\nb\nda\ndb\n"),
            [d("a", "da"), d("b", "db")]
        );
        assert_eq!(
            names("NAMES+DESCRIPTIONS\na\nb\nc\nda\ndb\n"),
            [d("a", "da"), d("b", "db"), n("c")]
        );
        assert_eq!(names("a\n\nb\n"), [n("a"), n(""), n("b")]);
    }

    #[test]
    fn answers() {
        assert_eq!(size(b"1M\n"), Some(1 << 20));
        assert_eq!(size(b"512"), Some(512));
        assert_eq!(size(b"abc\n"), None);
        assert_eq!(size(b"2M\n3M\n"), None);
        assert_eq!(fua(b"native\n"), Some(Fua::Native));
        assert_eq!(fua(b"NATIVE\n"), Some(Fua::Native));
        assert_eq!(fua(b"emulate"), Some(Fua::Emulate));
        assert_eq!(fua(b"none\n"), Some(Fua::None));
        assert_eq!(fua(b"native\nxx\n"), None);
        assert_eq!(fua(b"2\n"), None);
        assert_eq!(cache(b"native\n"), Some(Cache::Native));
        assert_eq!(cache(b"emulate\n"), Some(Cache::Emulate));
        assert_eq!(cache(b"1\n"), None);
        assert_eq!(
            thread_model(b"serialize_requests\n"),
            Some(ThreadModel::SerializeRequests)
        );
        assert_eq!(thread_model(b"parallel"), Some(ThreadModel::Parallel));
        assert_eq!(thread_model(b"fast\n"), None);
    }

    #[test]
    fn block_sizes() {
        let bs = |s: &str| block_size(s.as_bytes());
        let want = |minimum, preferred, maximum| {
            Ok(Some(BlockSize {
                minimum,
                preferred,
                maximum,
            }))
        };
        assert_eq!(bs("512 4K 1M\n"), want(512, 4096, 1 << 20));
        assert_eq!(bs("512\n4096\n1M\n"), want(512, 4096, 1 << 20));
        assert_eq!(bs("1 512 4294967295"), want(1, 512, u32::MAX));
        assert_eq!(bs("0 0 0\n"), Ok(None));
        assert!(bs("512 4K").is_err());
        assert!(bs("512 4K 1M 2M").is_err());
        assert!(bs("3 4K 1M").is_err());
        assert!(bs("4K 512 1M").is_err());
        assert!(bs("512 4K 1000000").is_err());
        assert!(bs("x 4K 1M").is_err());
    }

    fn ext(out: &str, start: u64, end: u64) -> Result<Vec<Extent>> {
        let mut e = Extents::new(start, end);
        extents(out.as_bytes(), &mut e)?;
        Ok(e.into_list())
    }

    fn x(offset: u64, length: u64, flags: u32) -> Extent {
        Extent {
            offset,
            length,
            flags,
        }
    }

    #[test]
    fn extent_lines() {
        assert_eq!(
            ext("0  1M\n1M 9M  hole,zero\n", 0, 10 << 20).unwrap(),
            [x(0, 1 << 20, 0), x(1 << 20, 9 << 20, HOLE_ZERO)]
        );
        // Numbers, words in any order, unknown words, tabs.
        assert_eq!(
            ext(
                "0\t4K\t3\n4K 4K zero,hole\n8K 4K 1\n12K 4K data\n",
                0,
                16384
            )
            .unwrap(),
            [
                x(0, 8192, HOLE_ZERO),
                x(8192, 4096, alloc::HOLE),
                x(12288, 4096, 0)
            ]
        );
        assert_eq!(
            ext("0 4K zero\n", 0, 4096).unwrap(),
            [x(0, 4096, alloc::ZERO)]
        );
        // Clipped to the range asked for; zero-length lines skipped.
        assert_eq!(
            ext("0 0\n0 1M hole\n", 4096, 8192).unwrap(),
            [x(4096, 4096, alloc::HOLE)]
        );
        let err = |out: &str| ext(out, 4096, 8192).unwrap_err();
        assert_eq!(err("").errno, errno::EINVAL);
        assert_eq!(err("8192 4K\n").errno, errno::EINVAL);
        assert_eq!(err("0 4K\n8K 4K\n").errno, errno::EINVAL);
        // Overlaps are errors, but what follows a full answer is not read.
        assert_eq!(
            ext("0 8K\n4K 4K\n", 0, 16384).unwrap_err().errno,
            errno::EINVAL
        );
        assert_eq!(ext("0 8K\n4K 4K\n", 4096, 8192).unwrap().len(), 1);
        assert_eq!(err("x 4K\n").errno, errno::EIO);
        assert_eq!(err("0 4K\n\n").errno, errno::EIO);
        assert_eq!(err("0\n").errno, errno::EIO);
    }
}
