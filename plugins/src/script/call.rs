//! One call of a script: its command line (`script METHOD ARGS...` with
//! `$tmpdir` set), its flag words, and what its exit status and stderr
//! mean (nbdkit-sh-plugin(3), "Exit codes").

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use libnbd::protocol::errno;
use libnbd::{Error, Flags, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// What a script's exit status says; an error (1, 4 and up, a signal)
/// is an `Err` instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 0: done (or true).
    Ok,
    /// 2: the script does not implement this method.
    Missing,
    /// 3: false, for the methods that answer yes or no.
    False,
}

/// A call's status and what it printed on stdout.
pub type Output = (Status, Vec<u8>);

/// An executable that answers methods.
#[derive(Debug, Clone)]
pub struct Script {
    /// Its absolute path: `$0`, and the prefix of its error messages.
    pub path: PathBuf,
    /// The file has no `#!` line, so it runs under `/bin/sh`, as
    /// `execvp` does with such a file (and as nbdkit's scripts do).
    via_sh: bool,
}

impl Script {
    /// The script at an absolute `path`.
    pub fn new(path: PathBuf) -> Script {
        let mut head = [0u8; 2];
        let via_sh = match std::fs::File::open(&path) {
            Ok(mut f) => {
                use std::io::Read;
                !matches!(f.read_exact(&mut head), Ok(()) if &head == b"#!")
            }
            // Unreadable but perhaps executable: let exec decide.
            Err(_) => false,
        };
        Script { path, via_sh }
    }

    fn command(&self, tmpdir: &Path, method: &str, args: &[&str]) -> std::process::Command {
        let mut c = if self.via_sh {
            let mut c = std::process::Command::new("/bin/sh");
            c.arg(&self.path);
            c
        } else {
            std::process::Command::new(&self.path)
        };
        c.arg(method).args(args).env("tmpdir", tmpdir);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        c
    }

    /// An error of this script: `SCRIPT: message`.
    pub fn error(&self, errno: u32, msg: impl std::fmt::Display) -> Error {
        Error::new(errno, format!("{}: {msg}", self.path.display()))
    }

    /// Run `method`, blocking the thread (configuration, `close` and
    /// `unload` run this way, off the reactor); stdin is empty.
    pub fn call_blocking(&self, tmpdir: &Path, method: &str, args: &[&str]) -> Result<Output> {
        libnbd::debug!("{}: {method} {}", self.path.display(), args.join(" "));
        let out = self
            .command(tmpdir, method, args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| self.spawn_error(e))?;
        Ok((self.status(out.status, &out.stderr)?, out.stdout))
    }

    /// Run `method` on the runtime, feeding it `stdin`, and collect its
    /// stdout.
    pub async fn call(
        &self,
        tmpdir: &Path,
        method: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<Output> {
        let mut out = Vec::new();
        let st = self
            .run(tmpdir, method, args, stdin, Stdout::Collect(&mut out))
            .await?;
        Ok((st, out))
    }

    /// Run `method` (pread) with its stdout read straight into `buf`;
    /// returns the status and how many bytes the script printed in all
    /// (more or fewer than `buf.len()` is the caller's error to report).
    pub async fn call_into(
        &self,
        tmpdir: &Path,
        method: &str,
        args: &[&str],
        buf: &mut [u8],
    ) -> Result<(Status, u64)> {
        let mut total = 0;
        let st = self
            .run(tmpdir, method, args, None, Stdout::Fill(buf, &mut total))
            .await?;
        Ok((st, total))
    }

    async fn run(
        &self,
        tmpdir: &Path,
        method: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
        stdout: Stdout<'_>,
    ) -> Result<Status> {
        libnbd::debug!("{}: {method} {}", self.path.display(), args.join(" "));
        let mut cmd = tokio::process::Command::from(self.command(tmpdir, method, args));
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        // A request abandoned at shutdown takes its script with it.
        cmd.kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| self.spawn_error(e))?;
        let (pin, pout, perr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let feed = async {
            if let (Some(mut p), Some(data)) = (pin, stdin) {
                // A script may exit without reading all it was sent
                // (EPIPE): its exit status says whether that is an error.
                let _ = p.write_all(data).await;
            }
        };
        let read_out = async {
            match pout {
                Some(p) => stdout.read(p).await,
                None => Ok(()),
            }
        };
        let read_err = async {
            let mut e = Vec::new();
            if let Some(mut p) = perr {
                p.read_to_end(&mut e).await?;
            }
            Ok::<_, std::io::Error>(e)
        };
        let ((), o, e) = tokio::join!(feed, read_out, read_err);
        let io = |e: std::io::Error| self.error(errno::EIO, format!("{method}: {e}"));
        o.map_err(io)?;
        let stderr = e.map_err(io)?;
        let status = child.wait().await.map_err(io)?;
        self.status(status, &stderr)
    }

    fn spawn_error(&self, e: std::io::Error) -> Error {
        self.error(
            errno::EIO,
            format!("{}: {}", self.path.display(), strerror(&e)),
        )
    }

    fn status(&self, st: ExitStatus, stderr: &[u8]) -> Result<Status> {
        match st.code() {
            Some(0) => Ok(Status::Ok),
            Some(2) => Ok(Status::Missing),
            Some(3) => Ok(Status::False),
            _ => {
                let (code, msg) = parse_stderr(stderr);
                let msg = match (msg, st.signal()) {
                    (Some(m), _) => m,
                    (None, Some(sig)) => format!("script terminated by signal {sig}"),
                    (None, None) => {
                        "script exited with error, but did not print an error message on stderr"
                            .to_string()
                    }
                };
                Err(self.error(code, msg))
            }
        }
    }
}

/// Where a call's stdout goes.
enum Stdout<'a> {
    /// All of it into a vector.
    Collect(&'a mut Vec<u8>),
    /// Into a buffer, counting all bytes printed (the excess is dropped).
    Fill(&'a mut [u8], &'a mut u64),
}

impl Stdout<'_> {
    async fn read(self, mut p: impl AsyncRead + Unpin) -> std::io::Result<()> {
        match self {
            Stdout::Collect(v) => {
                p.read_to_end(v).await?;
            }
            Stdout::Fill(buf, total) => {
                let mut at = 0;
                while at < buf.len() {
                    match p.read(&mut buf[at..]).await? {
                        0 => break,
                        n => at += n,
                    }
                }
                *total = at as u64;
                let mut junk = [0u8; 4096];
                loop {
                    match p.read(&mut junk).await? {
                        0 => break,
                        n => *total += n as u64,
                    }
                }
            }
        }
        Ok(())
    }
}

/// A system error's text without Rust's " (os error N)" suffix.
pub fn strerror(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The errno names a script may print first on stderr, and the NBD
/// error each becomes (the names and mapping of nbdkit 1.32; any other
/// word, or none, is EIO).
const ERRNO_NAMES: &[(&str, u32)] = &[
    ("EPERM", errno::EPERM),
    ("EIO", errno::EIO),
    ("ENOMEM", errno::ENOMEM),
    ("EINVAL", errno::EINVAL),
    ("ENOSPC", errno::ENOSPC),
    ("ESHUTDOWN", errno::ESHUTDOWN),
    ("ENOTSUP", errno::ENOTSUP),
    ("EOPNOTSUPP", errno::ENOTSUP),
    ("EOVERFLOW", errno::EOVERFLOW),
    ("EROFS", errno::EPERM),
    ("EDQUOT", errno::ENOSPC),
    ("EFBIG", errno::ENOSPC),
];

/// What a failed script's stderr says: the NBD error and the message.
/// A recognised errno name (any case) as the first word, followed by
/// whitespace or nothing, gives the error and the rest is the message;
/// otherwise the error is EIO and all of stderr is the message. `None`
/// when stderr is empty.
pub fn parse_stderr(stderr: &[u8]) -> (u32, Option<String>) {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim_end_matches(['\n', '\r']);
    if text.is_empty() {
        return (errno::EIO, None);
    }
    let word_end = text
        .find(|c: char| c.is_ascii_whitespace())
        .unwrap_or(text.len());
    let word = &text[..word_end];
    match ERRNO_NAMES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(word))
    {
        Some(&(_, code)) => (code, Some(text[word_end..].trim_start().to_string())),
        None => (errno::EIO, Some(text.to_string())),
    }
}

/// The flags of `pwrite` and `trim`.
pub const WRITE_FLAGS: &[(Flags, &str)] = &[(Flags::FUA, "fua")];
/// The flags of `zero`, in the order nbdkit prints them.
pub const ZERO_FLAGS: &[(Flags, &str)] = &[
    (Flags::FUA, "fua"),
    (Flags::MAY_TRIM, "may_trim"),
    (Flags::FAST_ZERO, "fast"),
];
/// The flags of `extents`.
pub const EXTENTS_FLAGS: &[(Flags, &str)] = &[(Flags::REQ_ONE, "req_one")];

/// The flags argument of a call: the words of the flags set, comma
/// separated, or the empty string.
pub fn flag_words(flags: Flags, words: &[(Flags, &str)]) -> String {
    words
        .iter()
        .filter(|(f, _)| flags.contains(*f))
        .map(|(_, w)| *w)
        .collect::<Vec<_>>()
        .join(",")
}

/// A boolean argument as scripts get it.
pub fn bool_word(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_words_in_order() {
        assert_eq!(flag_words(Flags::NONE, ZERO_FLAGS), "");
        assert_eq!(flag_words(Flags::FUA, WRITE_FLAGS), "fua");
        assert_eq!(flag_words(Flags::MAY_TRIM, ZERO_FLAGS), "may_trim");
        assert_eq!(
            flag_words(Flags::FAST_ZERO | Flags::MAY_TRIM, ZERO_FLAGS),
            "may_trim,fast"
        );
        assert_eq!(
            flag_words(Flags::FAST_ZERO | Flags::FUA | Flags::MAY_TRIM, ZERO_FLAGS),
            "fua,may_trim,fast"
        );
        // Flags a method does not take are not passed to it.
        assert_eq!(flag_words(Flags::MAY_TRIM | Flags::FUA, WRITE_FLAGS), "fua");
        assert_eq!(flag_words(Flags::REQ_ONE, EXTENTS_FLAGS), "req_one");
        assert_eq!(flag_words(Flags::FUA, EXTENTS_FLAGS), "");
        assert_eq!((bool_word(true), bool_word(false)), ("true", "false"));
    }

    #[test]
    fn errno_names_on_stderr() {
        let p = |s: &str| parse_stderr(s.as_bytes());
        assert_eq!(
            p("ENOSPC Out of space\n"),
            (errno::ENOSPC, Some("Out of space".into()))
        );
        assert_eq!(p("ENOSPC\n"), (errno::ENOSPC, Some(String::new())));
        assert_eq!(
            p("eperm lower case"),
            (errno::EPERM, Some("lower case".into()))
        );
        assert_eq!(
            p("EPERM\tafter a tab"),
            (errno::EPERM, Some("after a tab".into()))
        );
        assert_eq!(p("EROFS ro").0, errno::EPERM);
        assert_eq!(p("EDQUOT q").0, errno::ENOSPC);
        assert_eq!(p("EFBIG b").0, errno::ENOSPC);
        assert_eq!(p("EOPNOTSUPP z").0, errno::ENOTSUP);
        assert_eq!(p("ENOTSUP z").0, errno::ENOTSUP);
        assert_eq!(p("ESHUTDOWN s").0, errno::ESHUTDOWN);
        assert_eq!(p("ENOMEM").0, errno::ENOMEM);
        assert_eq!(p("EINVAL").0, errno::EINVAL);
        assert_eq!(p("EIO x").0, errno::EIO);
        // Unknown names, a name run into other text, leading blanks or an
        // error name on a later line: EIO with all of stderr.
        assert_eq!(
            p("EACCES denied"),
            (errno::EIO, Some("EACCES denied".into()))
        );
        assert_eq!(p("ENOSPCX").1.as_deref(), Some("ENOSPCX"));
        assert_eq!(p("ENOSPCX").0, errno::EIO);
        assert_eq!(p("EPERM:x").0, errno::EIO);
        assert_eq!(p("  ENOSPC x").0, errno::EIO);
        assert_eq!(p("oops\nENOSPC"), (errno::EIO, Some("oops\nENOSPC".into())));
        assert_eq!(p(""), (errno::EIO, None));
        assert_eq!(p("\n"), (errno::EIO, None));
    }

    fn script(dir: &Path, body: &str) -> Script {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("s");
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        Script::new(path)
    }

    #[test]
    fn exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        let s = script(
            dir.path(),
            "#!/bin/sh\ncase \"$1\" in\n ok) echo \"$2 $tmpdir\" ;;\n missing) exit 2 ;;\n false) exit 3 ;;\n \
             err) echo 'ENOSPC full up' >&2; exit 1 ;;\n quiet) exit 8 ;;\n reserved) echo EPERM >&2; exit 4 ;;\n \
             sig) kill -9 $$ ;;\nesac\n",
        );
        let t = dir.path();
        let (st, out) = s.call_blocking(t, "ok", &["arg"]).unwrap();
        assert_eq!(st, Status::Ok);
        assert_eq!(out, format!("arg {}\n", t.display()).into_bytes());
        assert_eq!(
            s.call_blocking(t, "missing", &[]).unwrap().0,
            Status::Missing
        );
        assert_eq!(s.call_blocking(t, "false", &[]).unwrap().0, Status::False);
        let e = s.call_blocking(t, "err", &[]).unwrap_err();
        assert_eq!(e.errno, errno::ENOSPC);
        assert_eq!(e.msg, format!("{}: full up", s.path.display()));
        let e = s.call_blocking(t, "quiet", &[]).unwrap_err();
        assert_eq!(e.errno, errno::EIO);
        assert!(
            e.msg.ends_with("did not print an error message on stderr"),
            "{}",
            e.msg
        );
        // Codes 4 to 7 are reserved: errors, as nbdkit 1.32 treats them.
        assert_eq!(
            s.call_blocking(t, "reserved", &[]).unwrap_err().errno,
            errno::EPERM
        );
        let e = s.call_blocking(t, "sig", &[]).unwrap_err();
        assert!(
            e.msg.ends_with("script terminated by signal 9"),
            "{}",
            e.msg
        );
    }

    #[tokio::test]
    async fn stdin_and_stdout_of_a_call() {
        let dir = tempfile::tempdir().unwrap();
        // No #! line: run by /bin/sh.
        let s = script(
            dir.path(),
            "case \"$1\" in\n cat) cat ;;\n ignore) exit 0 ;;\n four) printf abcd ;;\nesac\n",
        );
        let t = dir.path();
        let data = vec![7u8; 300_000];
        let (st, out) = s.call(t, "cat", &[], Some(&data)).await.unwrap();
        assert_eq!((st, out.len()), (Status::Ok, data.len()));
        assert_eq!(out, data);
        // A script that does not read its stdin is not an error.
        let (st, _) = s.call(t, "ignore", &[], Some(&data)).await.unwrap();
        assert_eq!(st, Status::Ok);
        let mut buf = [0u8; 4];
        assert_eq!(
            s.call_into(t, "four", &[], &mut buf).await.unwrap(),
            (Status::Ok, 4)
        );
        assert_eq!(&buf, b"abcd");
        let mut small = [0u8; 2];
        assert_eq!(s.call_into(t, "four", &[], &mut small).await.unwrap().1, 4);
        let mut big = [0u8; 8];
        assert_eq!(s.call_into(t, "four", &[], &mut big).await.unwrap().1, 4);
    }

    #[test]
    fn not_executable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        let e = Script::new(path.clone())
            .call_blocking(dir.path(), "load", &[])
            .unwrap_err();
        let p = path.display();
        assert_eq!(e.msg, format!("{p}: {p}: Permission denied"));
    }
}
