//! # error: inject errors, to test how clients cope
//!
//! Each request kind (pread, pwrite, trim, zero, extents, cache) fails at
//! a chosen rate with a chosen NBD error, optionally only while a trigger
//! file exists. The failure is logged (`injecting EIO error into pread`)
//! and the layer below is not called.
//!
//! ```text
//! nbdkit --filter=error file disk.img error-rate=1%
//! nbdkit --filter=error file disk.img error=ENOSPC error-pwrite-rate=100% error-zero-rate=100%
//! nbdkit --filter=error file disk.img error-rate=100% error-file=/tmp/inject
//! ```
//!
//! ## Parameters
//!
//! All optional; without a rate the filter does nothing.
//!
//! - `error=EPERM|EIO|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN`: the error to
//!   return (default EIO).
//! - `error-rate=N%` or `error-rate=0..1`: the probability that a request
//!   fails (default 0; `100%` or `1` fails every request).
//! - `error-file=FILENAME`: inject errors only while FILENAME exists.
//! - `error-pread=`, `error-pread-rate=`, `error-pread-file=` and the same
//!   for `pwrite`, `trim`, `zero`, `extents` and `cache`: the same
//!   settings for one kind of request only.
//!
//! Settings apply in command-line order, so `error-rate=1 error-pread-rate=0`
//! fails everything but reads, and `error-pread-rate=0 error-rate=1`
//! fails everything.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::protocol::errno;
use libnbd::{
    ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags, Handle, Next,
    OpenContext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "error",
    help: "\
error=EPERM|EIO|ENOMEM|EINVAL|ENOSPC|ESHUTDOWN
                               The error indication to return.
error-rate=0%..100%|0..1       Rate of errors to generate.
error-file=TRIGGER             Set trigger filename.
error-pread*, error-pwrite*, error-trim*, error-zero*, error-extents*
                               Apply settings only to read/write/etc",
    create,
};

/// The request kinds errors can be injected into.
const OPS: [&str; 6] = ["pread", "pwrite", "trim", "zero", "extents", "cache"];

#[derive(Clone, Copy)]
enum Op {
    Pread = 0,
    Pwrite,
    Trim,
    Zero,
    Extents,
    Cache,
}

/// The settings of one request kind.
#[derive(Debug, Clone, PartialEq)]
struct Setting {
    errno: u32,
    rate: f64,
    file: Option<PathBuf>,
}

impl Default for Setting {
    fn default() -> Self {
        Setting {
            errno: errno::EIO,
            rate: 0.0,
            file: None,
        }
    }
}

fn parse_error(key: &str, v: &str) -> ConfigResult<u32> {
    Ok(match v.trim() {
        "EPERM" => errno::EPERM,
        "EIO" => errno::EIO,
        "ENOMEM" => errno::ENOMEM,
        "EINVAL" => errno::EINVAL,
        "ENOSPC" => errno::ENOSPC,
        "ESHUTDOWN" => errno::ESHUTDOWN,
        _ => {
            return Err(ConfigError::new(format!(
                "{key}: unknown error name '{v}' (EPERM, EIO, ENOMEM, EINVAL, ENOSPC or ESHUTDOWN)"
            )))
        }
    })
}

fn parse_rate(key: &str, v: &str) -> ConfigResult<f64> {
    let t = v.trim();
    let (num, scale) = match t.strip_suffix('%') {
        Some(n) => (n, 100.0),
        None => (t, 1.0),
    };
    let r = num
        .trim()
        .parse::<f64>()
        .map_err(|_| ConfigError::new(format!("{key}: could not parse rate '{v}'")))?
        / scale;
    if !(0.0..=1.0).contains(&r) {
        return Err(ConfigError::new(format!(
            "{key}: rate out of range: '{v}' parsed as {r}"
        )));
    }
    Ok(r)
}

/// Which ops a key sets and which field, or None if it is not ours.
fn classify(key: &str) -> Option<(Option<usize>, &str)> {
    let rest = key.strip_prefix("error")?;
    let (op, field) = match rest.strip_prefix('-') {
        None if rest.is_empty() => (None, ""),
        None => return None,
        Some(r) => match OPS
            .iter()
            .position(|o| r == *o || r.starts_with(&format!("{o}-")))
        {
            Some(i) => (Some(i), &r[OPS[i].len()..]),
            None => (None, rest),
        },
    };
    let field = match field {
        "" => "error",
        "-rate" => "rate",
        "-file" => "file",
        _ => return None,
    };
    Some((op, field))
}

/// Take our keys from `p` (in command-line order) into the settings.
fn parse(p: &mut Params) -> ConfigResult<[Setting; 6]> {
    let mut settings: [Setting; 6] = Default::default();
    let mut rest = Vec::new();
    for (k, v) in p.items().to_vec() {
        let Some((op, field)) = classify(&k) else {
            rest.push((k, v));
            continue;
        };
        let targets = match op {
            Some(i) => i..i + 1,
            None => 0..OPS.len(),
        };
        match field {
            "error" => {
                let e = parse_error(&k, &v)?;
                targets.for_each(|i| settings[i].errno = e);
            }
            "rate" => {
                let r = parse_rate(&k, &v)?;
                targets.for_each(|i| settings[i].rate = r);
            }
            _ => targets.for_each(|i| settings[i].file = Some(PathBuf::from(&v))),
        }
    }
    *p = Params::new(rest);
    Ok(settings)
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    Ok(Arc::new(ErrorFilter {
        settings: Arc::new(parse(p)?),
    }))
}

struct ErrorFilter {
    settings: Arc<[Setting; 6]>,
}

#[async_trait]
impl Filter for ErrorFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(ErrorHandle {
            next: next.open(ctx).await?,
            settings: self.settings.clone(),
        }))
    }
}

struct ErrorHandle {
    next: Box<dyn Handle>,
    settings: Arc<[Setting; 6]>,
}

impl ErrorHandle {
    /// Fail this request, or not.
    fn inject(&self, op: Op) -> Result<()> {
        let s = &self.settings[op as usize];
        if s.rate <= 0.0 {
            return Ok(());
        }
        if let Some(f) = &s.file {
            if std::fs::symlink_metadata(f).is_err() {
                return Ok(());
            }
        }
        if s.rate < 1.0 && rand::random::<f64>() >= s.rate {
            return Ok(());
        }
        let name = match s.errno {
            errno::EPERM => "EPERM",
            errno::ENOMEM => "ENOMEM",
            errno::EINVAL => "EINVAL",
            errno::ENOSPC => "ENOSPC",
            errno::ESHUTDOWN => "ESHUTDOWN",
            _ => "EIO",
        };
        Err(Error::new(
            s.errno,
            format!("injecting {name} error into {}", OPS[op as usize]),
        ))
    }
}

#[async_trait]
impl Handle for ErrorHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Pread)?;
        self.next.pread(buf, offset, flags).await
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Pwrite)?;
        self.next.pwrite(buf, offset, flags).await
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Trim)?;
        self.next.trim(count, offset, flags).await
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Zero)?;
        self.next.zero(count, offset, flags).await
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        self.inject(Op::Extents)?;
        self.next.extents(count, offset, flags, ext).await
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        self.inject(Op::Cache)?;
        self.next.cache(count, offset, flags).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offset::testing::*;

    fn settings(words: &[&str]) -> [Setting; 6] {
        let mut p = params(words);
        let s = parse(&mut p).unwrap();
        assert!(p.items().iter().all(|(k, _)| k == "other"));
        s
    }

    #[test]
    fn error_parameters() {
        assert_eq!(parse_rate("r", "10%").unwrap(), 0.1);
        assert_eq!(parse_rate("r", "0.25").unwrap(), 0.25);
        assert_eq!(parse_rate("r", "1").unwrap(), 1.0);
        assert!(parse_rate("r", "150%").is_err());
        assert!(parse_rate("r", "0.5x").is_err());
        assert!(parse_rate("r", "-1").is_err());
        assert!(parse_error("e", "EOVERFLOW").is_err());
        assert_eq!(parse_error("e", "ENOSPC").unwrap(), errno::ENOSPC);
        assert_eq!(classify("error"), Some((None, "error")));
        assert_eq!(classify("error-rate"), Some((None, "rate")));
        assert_eq!(classify("error-file"), Some((None, "file")));
        assert_eq!(classify("error-pread"), Some((Some(0), "error")));
        assert_eq!(classify("error-extents-rate"), Some((Some(4), "rate")));
        assert_eq!(classify("error-cache-file"), Some((Some(5), "file")));
        assert_eq!(classify("error-flush"), None);
        assert_eq!(classify("errors"), None);
        assert_eq!(classify("error-pread-x"), None);
        assert!(create(&mut params(&["error=EBADF"])).is_err());
        assert!(create(&mut params(&["error-zero-rate=2"])).is_err());
        let s = settings(&["error-rate=1", "error-pread-rate=0", "other=1"]);
        assert_eq!(s[0].rate, 0.0);
        assert_eq!(s[1].rate, 1.0);
        let s = settings(&["error-pread-rate=0", "error-rate=1"]);
        assert_eq!(s[0].rate, 1.0);
        let mut p = params(&["error-rate=1", "other=1", "error-cache=ENOMEM"]);
        create(&mut p).unwrap();
        assert_eq!(p.items(), &[("other".to_string(), "1".to_string())]);
    }

    #[tokio::test]
    async fn error_rate_pread_and_file_trigger() {
        let dir = tempfile::tempdir().unwrap();
        let trigger = dir.path().join("inject");
        let mem = Mem::new(4096);
        let mut p = params(&[
            "error-pread-rate=100%",
            "error=ENOSPC",
            &format!("error-file={}", trigger.display()),
            "error-pwrite-rate=1",
        ]);
        let s = stack(vec![create(&mut p).unwrap()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        // No trigger file: nothing fails.
        read(&*h, 0, 512).await.unwrap();
        h.pwrite(&[1; 512], 0, Flags::NONE).await.unwrap();
        std::fs::write(&trigger, "").unwrap();
        let e = read(&*h, 0, 512).await.unwrap_err();
        assert_eq!(e.errno, errno::ENOSPC);
        assert_eq!(e.msg, "injecting ENOSPC error into pread");
        let e = h.pwrite(&[1; 512], 0, Flags::NONE).await.unwrap_err();
        assert_eq!(e.msg, "injecting ENOSPC error into pwrite");
        // Other kinds are untouched.
        h.zero(512, 0, Flags::NONE).await.unwrap();
        extents(&*h, 0, 4096).await.unwrap();
        std::fs::remove_file(&trigger).unwrap();
        read(&*h, 0, 512).await.unwrap();
    }

    #[tokio::test]
    async fn error_rate_is_a_probability() {
        let mem = Mem::new(4096);
        let mut p = params(&["error-rate=50%"]);
        let s = stack(vec![create(&mut p).unwrap()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        let mut failed = 0;
        for _ in 0..1000 {
            if h.cache(512, 0, Flags::NONE).await.is_err() {
                failed += 1;
            }
        }
        assert!((350..650).contains(&failed), "{failed}");
    }
}
