//! Configuration of plugins and filters: `key=value` parameters, the
//! size and boolean syntaxes of nbdkit, and the registry entries that
//! name each plugin and filter with its help text.

use std::sync::Arc;

use crate::backend::{Filter, Plugin};

/// A configuration error, reported on stderr and as exit status 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// A configuration error with a message.
    pub fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }
}

/// Result of configuration.
pub type ConfigResult<T> = Result<T, ConfigError>;

/// The `key=value` parameters of the command line, in order. Filters
/// take their keys first (outermost first), the plugin gets the rest and
/// any key nobody took is an error.
#[derive(Debug, Clone, Default)]
pub struct Params {
    items: Vec<(String, String)>,
}

impl Params {
    /// Parameters from `key=value` pairs.
    pub fn new(items: Vec<(String, String)>) -> Self {
        Params { items }
    }
    /// Parse `key=value` words; a word without `=` becomes `magic=word`
    /// (nbdkit's magic config key), if the plugin has one. As nbdkit,
    /// that holds for any word, not only the first (`nbdkit memory 1G 2G`
    /// is `size=1G size=2G`, and the last wins).
    pub fn parse<S: AsRef<str>>(words: &[S], magic: Option<&str>) -> ConfigResult<Self> {
        let mut items = Vec::new();
        for w in words {
            let w = w.as_ref();
            match w.split_once('=') {
                // Only a word starting with a key name is key=value, so
                // "./a=b" or "\"a=b\"" is a magic value.
                Some((k, v)) if is_key(k) => items.push((k.to_string(), v.to_string())),
                _ => match magic {
                    Some(m) => items.push((m.to_string(), w.to_string())),
                    None => {
                        return Err(ConfigError::new(format!(
                            "parameter '{w}' must be key=value (this plugin has no magic parameter)"
                        )))
                    }
                },
            }
        }
        Ok(Params { items })
    }
    /// Remove and return every value of `key`, in order.
    pub fn take_all(&mut self, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        self.items.retain(|(k, v)| {
            if k == key {
                out.push(v.clone());
                false
            } else {
                true
            }
        });
        out
    }
    /// Remove `key` and return its last value.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.take_all(key).pop()
    }
    /// Remove `key` and parse it as a size.
    pub fn take_size(&mut self, key: &str) -> ConfigResult<Option<u64>> {
        self.take(key)
            .map(|v| parse_size(&v).map_err(|e| ConfigError::new(format!("{key}: {e}"))))
            .transpose()
    }
    /// Remove `key` and parse it as a boolean.
    pub fn take_bool(&mut self, key: &str) -> ConfigResult<Option<bool>> {
        self.take(key)
            .map(|v| parse_bool(&v).map_err(|e| ConfigError::new(format!("{key}: {e}"))))
            .transpose()
    }
    /// Remove `key` and parse it with `FromStr`.
    pub fn take_parsed<T: std::str::FromStr>(&mut self, key: &str) -> ConfigResult<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.take(key)
            .map(|v| {
                v.trim()
                    .parse::<T>()
                    .map_err(|e| ConfigError::new(format!("{key}: could not parse '{v}': {e}")))
            })
            .transpose()
    }
    /// Remove and return every parameter left, in command-line order
    /// (for plugins that hand keys they do not know on, as `sh` does).
    pub fn take_rest(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.items)
    }
    /// Is `key` present?
    pub fn has(&self, key: &str) -> bool {
        self.items.iter().any(|(k, _)| k == key)
    }
    /// Error if any parameter is left, naming `who` would not take it.
    pub fn finish(&self, who: &str) -> ConfigResult<()> {
        match self.items.first() {
            None => Ok(()),
            Some((k, _)) => Err(ConfigError::new(format!(
                "unknown parameter '{k}' (see 'nbdkit {who} --help')"
            ))),
        }
    }
    /// Every parameter left.
    pub fn items(&self) -> &[(String, String)] {
        &self.items
    }
}

/// Is this a parameter key (`[A-Za-z][A-Za-z0-9._-]*`, as nbdkit)?
fn is_key(k: &str) -> bool {
    let mut c = k.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Parse a size the way nbdkit does: a decimal number with an optional
/// suffix `b` (bytes), `s` (512-byte sectors), `K`, `M`, `G`, `T`, `P`,
/// `E` (powers of 1024, either case, optionally followed by `B` or `iB`).
/// At most 2^63-1.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("could not parse size string '{s}'"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size '{s}' is too large"))?;
    let suffix = suffix
        .strip_suffix("iB")
        .or_else(|| {
            if suffix.len() == 2 {
                suffix.strip_suffix('B')
            } else {
                None
            }
        })
        .unwrap_or(suffix);
    let mult: u64 = match suffix {
        "" | "b" | "B" => 1,
        "s" | "S" => 512,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Err(format!("could not parse size string '{s}': bad suffix")),
    };
    let v = n
        .checked_mul(mult)
        .filter(|v| *v <= i64::MAX as u64)
        .ok_or_else(|| format!("size '{s}' exceeds maximum value (2^63-1)"))?;
    Ok(v)
}

/// Parse a boolean as nbdkit does: 1/true/yes/on or 0/false/no/off.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Ok(true),
        "0" | "false" | "f" | "no" | "n" | "off" | "" => Ok(false),
        _ => Err(format!("could not decipher boolean '{s}'")),
    }
}

/// Format a size the way nbdinfo's `export-size-str` does: the largest
/// binary unit that divides it exactly, else bytes (e.g. `1G`, `1536K`).
pub fn human_size(n: u64) -> String {
    const UNITS: [(u64, &str); 6] = [
        (1 << 60, "E"),
        (1 << 50, "P"),
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (m, u) in UNITS {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{}", n / m, u);
        }
    }
    n.to_string()
}

/// A plugin in the registry.
pub struct PluginEntry {
    /// The name on the command line (`nbdkit NAME`).
    pub name: &'static str,
    /// Its manual: what it does, an example, its parameters (for `--help`).
    pub help: &'static str,
    /// The key a bare first parameter stands for (`file` for `nbdkit file
    /// disk.img`, `size` for `nbdkit memory 1G`).
    pub magic: Option<&'static str>,
    /// Build the plugin from the parameters it knows (the filters have
    /// taken theirs); [`configure`](Self::configure) rejects the rest.
    pub create: fn(&mut Params) -> ConfigResult<Arc<dyn Plugin>>,
}

impl PluginEntry {
    /// Build the plugin from the parameters left after the filters took
    /// theirs: any key it does not take is an error.
    pub fn configure(&self, params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
        let plugin = (self.create)(params)?;
        params.finish(self.name)?;
        Ok(plugin)
    }
}

/// A filter in the registry.
pub struct FilterEntry {
    /// The name in `--filter=NAME`.
    pub name: &'static str,
    /// Its manual (for `--help`).
    pub help: &'static str,
    /// Build the filter, taking only the parameters it knows.
    pub create: fn(&mut Params) -> ConfigResult<Arc<dyn Filter>>,
}

/// Read a secret the way `nbdkit_read_password` does: the value itself,
/// `-` (typed on the terminal), `+FILE`, or `-FD`.
pub fn read_password(key: &str, value: &str) -> ConfigResult<String> {
    if value == "-" {
        return read_from_tty(key);
    }
    if let Some(path) = value.strip_prefix('+') {
        let s = std::fs::read(path).map_err(|e| ConfigError::new(format!("{key}: {path}: {e}")))?;
        return Ok(strip_newlines(s));
    }
    if let Some(fd) = value.strip_prefix('-') {
        let fd: i32 = fd.parse().map_err(|_| {
            ConfigError::new(format!(
                "{key}: could not parse file descriptor in '{value}'"
            ))
        })?;
        if fd <= 2 {
            return Err(ConfigError::new(format!(
                "{key}: cannot use stdin, stdout or stderr (-{fd}) to read a password"
            )));
        }
        use std::os::fd::FromRawFd;
        // Safety: the user handed this descriptor to us to read and close,
        // as with nbdkit; a bad number fails at the fcntl check below.
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
            .map_err(|e| ConfigError::new(format!("{key}: file descriptor {fd}: {e}")))?;
        let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut s)
            .map_err(|e| ConfigError::new(format!("{key}: reading file descriptor {fd}: {e}")))?;
        return Ok(strip_newlines(s));
    }
    Ok(value.to_string())
}

fn strip_newlines(mut s: Vec<u8>) -> String {
    while s.last() == Some(&b'\n') {
        s.pop();
    }
    String::from_utf8_lossy(&s).into_owned()
}

fn read_from_tty(key: &str) -> ConfigResult<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    if !nix::unistd::isatty(0).unwrap_or(false) {
        return Err(ConfigError::new(format!(
            "{key}=-: stdin is not a tty, cannot read password interactively"
        )));
    }
    eprint!("{key}: ");
    let saved = tcgetattr(&stdin).ok();
    if let Some(t) = &saved {
        let mut quiet = t.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        let _ = tcsetattr(&stdin, SetArg::TCSAFLUSH, &quiet);
    }
    let mut line = String::new();
    let r = stdin.read_line(&mut line);
    if let Some(t) = &saved {
        let _ = tcsetattr(&stdin, SetArg::TCSAFLUSH, t);
    }
    crate::elog!();
    r.map_err(|e| ConfigError::new(format!("{key}: reading stdin: {e}")))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// Check that a plugin's or filter's source file opens with its manual
/// in the shape all of them share: `//! # NAME: what it does`, an example
/// command line in a `text` block, and a `## Parameters` section naming
/// every key that its `--help` text lists. The registries' tests run it
/// over every entry, so a new plugin or filter cannot skip its manual.
pub fn check_manual(name: &str, source: &str, help: &str) -> Result<(), String> {
    let doc: Vec<&str> = source
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .map(|l| l.trim_start_matches("//!").trim_start())
        .collect();
    let title = format!("# {name}: ");
    if !doc.first().is_some_and(|l| l.starts_with(&title)) {
        return Err(format!("{name}: the manual must start with '{title}...'"));
    }
    let mut in_text = false;
    let example = doc.iter().any(|l| {
        match *l {
            "```text" => in_text = true,
            "```" => in_text = false,
            _ => return in_text && l.starts_with("nbdkit "),
        }
        false
    });
    if !example {
        return Err(format!(
            "{name}: the manual needs an example command line (a ```text block with 'nbdkit ...')"
        ));
    }
    let Some(params) = doc.iter().position(|l| *l == "## Parameters") else {
        return Err(format!(
            "{name}: the manual needs a '## Parameters' section"
        ));
    };
    let text = doc[params..].join("\n");
    for line in help.lines() {
        let Some((keys, _)) = line.trim().split_once('=') else {
            continue;
        };
        for key in keys.trim_matches(|c| c == '[' || c == ']').split('|') {
            if !text.contains(&format!("{key}=")) {
                return Err(format!(
                    "{name}: '{key}=' is in the help text but not in the manual's parameters"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("4T"), Ok(4 << 40));
        assert_eq!(parse_size("2s"), Ok(1024));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("7E"), Ok(7 << 60));
        assert!(parse_size("8E").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999999").is_err());
    }

    #[test]
    fn human() {
        assert_eq!(human_size(1 << 30), "1G");
        assert_eq!(human_size(1536 << 10), "1536K");
        assert_eq!(human_size(1000), "1000");
    }

    #[test]
    fn params_magic_and_take() {
        let mut p = Params::parse(&["1G", "a=1", "a=2"], Some("size")).unwrap();
        assert_eq!(p.take_size("size"), Ok(Some(1 << 30)));
        assert_eq!(p.take_all("a"), vec!["1", "2"]);
        assert!(p.finish("memory").is_ok());
        let mut p = Params::parse(&["x", "a=1", "y"], Some("size")).unwrap();
        assert_eq!(
            p.take_rest(),
            vec![
                ("size".to_string(), "x".to_string()),
                ("a".into(), "1".into()),
                ("size".into(), "y".into())
            ]
        );
        assert!(p.finish("memory").is_ok());
        assert!(Params::parse(&["x"], None).is_err());
        let p = Params::parse(&["b=1"], None).unwrap();
        assert!(p.finish("null").is_err());
        let mut p = Params::parse(&["./x=y"], Some("file")).unwrap();
        assert_eq!(p.take("file").as_deref(), Some("./x=y"));
        let mut p = Params::parse(&["\"a=b\"", "size=1"], Some("data")).unwrap();
        assert_eq!(p.take("data").as_deref(), Some("\"a=b\""));
        let mut p = Params::parse(&["1a=b"], Some("file")).unwrap();
        assert_eq!(p.take("file").as_deref(), Some("1a=b"));
    }
}
