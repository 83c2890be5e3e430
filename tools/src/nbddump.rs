//! `nbddump`: print the content of an NBD export as a hexdump, like
//! libnbd 1.14's nbddump (byte for byte the same output).
//!
//! ```text
//! nbddump [--color|--no-color] [--offset=N] [-n N|--length=N] NBD
//! ```
//!
//! `NBD` is an NBD URI or `[ CMD ARGS ... ]`, a server to run for the
//! occasion (`nbddump -- [ qemu-nbd -r -f qcow2 disk.qcow2 ]`).
//!
//! ```text
//! $ nbddump nbd://localhost
//! 0000000000: 68 65 6c 6c 6f 2c 20 77  6f 72 6c 64 21 00 00 00 |hello, world!...|
//! 0000000010: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|
//! *
//! 0000001000: 00 00 00 21                                      |...!            |
//! ```
//!
//! Each line is the offset in hex, 16 bytes in hex and the same bytes
//! as ASCII (`.` for the unprintable). A line equal to the one before
//! is not printed: a `*` line stands for the run of repeats. The last
//! line of the export is always printed.
//!
//! Options:
//! - `-n N`, `--length=N` (or `--limit`): dump at most N bytes (a
//!   decimal number, with an optional `K`, `M`, `G`, ... suffix);
//! - `--offset=N` (or `--skip`), newer libnbd's: start at byte N (same
//!   syntax); the lines then start at N (16 bytes each from there, not
//!   aligned) and show offsets from the start of the export, as libnbd's
//!   (`nbddump --offset=15 --length=33` prints lines at `0f`, `1f`,
//!   `2f`). An offset past the end of the export is an error.
//! - `--color`, `--colour`, `--no-color`, `--no-colour`: ANSI colours
//!   (then `│` and `☆` in place of `|` and `*`); by default when stdout
//!   is a terminal;
//! - `--help`, `-V`/`--version`.
//!
//! Big exports dump quickly: many reads are in flight at once, and
//! areas the server reports as zero (`base:allocation`) are not read.

use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};

use anyhow::{anyhow, Context, Result};
use clap::{Arg, ArgAction, Command};
use futures::stream::{self, TryStreamExt};
use libnbd::captive::{self, Target};
use libnbd::client::{ConnectOptions, Connection};
use libnbd::protocol::CONTEXT_BASE_ALLOCATION;

use crate::cli::{self, toggle, Action, CommandLine, Tool};

/// Upstream's usage text, with our further options under "Other options".
const USAGE: &str = "
Hexdump the content of a disk over NBD:

    nbddump NBD-URI | [ CMD ARGS ... ]

Other options:

    nbddump --help
    nbddump --version
    nbddump [--color|--no-color] [-n N|--length=N] NBD-URI | [ CMD ARGS ... ]
    nbddump [--offset=N] [--length=N] NBD-URI | [ CMD ARGS ... ]

Examples:

    nbddump nbd://localhost
    nbddump -- [ qemu-nbd -r -f qcow2 file.qcow2 ]

Please read the nbddump(1) manual page for full usage.

";

const TOOL: Tool = Tool {
    name: "nbddump",
    usage: USAGE,
    version: || cli::libnbd_version("nbddump"),
    long_options: &[
        "--help",
        "--version",
        "--color",
        "--colors",
        "--colour",
        "--colours",
        "--no-color",
        "--no-colors",
        "--no-colour",
        "--no-colours",
        "--length",
        "--limit",
        "--offset",
        "--skip",
    ],
    short_options: &["-n", "-V"],
};

/// Bytes per read request.
const CHUNK: u64 = 2 << 20;
/// Read requests in flight.
const IN_FLIGHT: usize = 16;
/// Bytes per block status request.
const STATUS_WINDOW: u64 = 1 << 30;

const ZERO_LINE: [u8; 16] = [0; 16];
const HEX: &[u8; 16] = b"0123456789abcdef";

mod colour {
    pub const RESTORE: &[u8] = b"\x1b[0m";
    pub const GREY: &[u8] = b"\x1b[22;90m";
    pub const GREEN: &[u8] = b"\x1b[22;32m";
    pub const BOLD_BLUE: &[u8] = b"\x1b[1;34m";
    pub const BOLD_RED: &[u8] = b"\x1b[1;31m";
    pub const BOLD_MAGENTA: &[u8] = b"\x1b[1;35m";
}

/// Formats a stream of bytes (fed in order from offset 0) as hexdump
/// lines, collapsing repeated lines.
pub struct Dumper<W: Write> {
    w: W,
    /// The export size: a line that reaches its end is always printed.
    size: u64,
    color: bool,
    /// Offset of the next byte to come.
    offset: u64,
    /// A partial line waiting for more bytes.
    line: [u8; 16],
    line_len: usize,
    /// The last line seen (printed or collapsed).
    prev: Option<[u8; 16]>,
    /// A `*` has been printed for the current run of repeats.
    collapsed: bool,
    scratch: Vec<u8>,
}

impl<W: Write> Dumper<W> {
    /// A dumper writing to `w` for an export of `size` bytes.
    pub fn new(w: W, size: u64, color: bool) -> Self {
        Self::starting_at(w, size, color, 0)
    }

    /// The same, fed bytes from offset `start` on.
    pub fn starting_at(w: W, size: u64, color: bool, start: u64) -> Self {
        Dumper {
            w,
            size,
            color,
            offset: start,
            line: [0; 16],
            line_len: 0,
            prev: None,
            collapsed: false,
            scratch: Vec::with_capacity(512),
        }
    }

    /// The next bytes.
    pub fn data(&mut self, mut d: &[u8]) -> io::Result<()> {
        if self.line_len > 0 {
            let take = (16 - self.line_len).min(d.len());
            self.line[self.line_len..self.line_len + take].copy_from_slice(&d[..take]);
            self.line_len += take;
            self.offset += take as u64;
            d = &d[take..];
            if self.line_len == 16 {
                let line = self.line;
                self.line_len = 0;
                self.emit(self.offset - 16, &line)?;
            }
        }
        while d.len() >= 16 {
            self.emit(self.offset, &d[..16])?;
            self.offset += 16;
            d = &d[16..];
        }
        if !d.is_empty() {
            self.line[..d.len()].copy_from_slice(d);
            self.line_len = d.len();
            self.offset += d.len() as u64;
        }
        Ok(())
    }

    /// The next `n` bytes are zero (without materialising them).
    pub fn zeros(&mut self, mut n: u64) -> io::Result<()> {
        if self.line_len > 0 {
            let take = ((16 - self.line_len) as u64).min(n) as usize;
            self.data(&ZERO_LINE[..take])?;
            n -= take as u64;
        }
        let mut full = n / 16;
        if full > 0 {
            self.emit(self.offset, &ZERO_LINE)?;
            self.offset += 16;
            full -= 1;
        }
        if full > 1 {
            // Every line but the run's last repeats the one before and
            // is followed by another: all collapse into one `*`.
            self.mark_repeat()?;
            self.offset += (full - 1) * 16;
            full = 1;
        }
        if full == 1 {
            self.emit(self.offset, &ZERO_LINE)?;
            self.offset += 16;
        }
        self.data(&ZERO_LINE[..(n % 16) as usize])
    }

    /// Print the last partial line and flush.
    pub fn finish(mut self) -> io::Result<W> {
        if self.line_len > 0 {
            let line = self.line;
            let len = self.line_len;
            self.emit(self.offset - len as u64, &line[..len])?;
        }
        self.w.flush()?;
        Ok(self.w)
    }

    fn mark_repeat(&mut self) -> io::Result<()> {
        if !self.collapsed {
            self.w
                .write_all(if self.color { "☆\n" } else { "*\n" }.as_bytes())?;
            self.collapsed = true;
        }
        Ok(())
    }

    fn emit(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        // A short line is compared as if padded with zeros.
        let mut padded = [0u8; 16];
        padded[..bytes.len()].copy_from_slice(bytes);
        let last = offset.saturating_add(16) >= self.size;
        if !last && self.prev == Some(padded) {
            return self.mark_repeat();
        }
        self.prev = Some(padded);
        self.collapsed = false;
        self.scratch.clear();
        if self.color {
            format_colour(&mut self.scratch, offset, bytes);
        } else {
            format_plain(&mut self.scratch, offset, bytes);
        }
        self.w.write_all(&self.scratch)
    }
}

fn push_hex(out: &mut Vec<u8>, b: u8) {
    out.push(HEX[usize::from(b >> 4)]);
    out.push(HEX[usize::from(b & 15)]);
}

/// Spaces standing for the hex of the bytes missing from a short line.
fn hex_padding(len: usize) -> usize {
    (16 - len) * 3 + usize::from(len < 8)
}

fn format_plain(out: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    out.extend_from_slice(format!("{offset:010x}: ").as_bytes());
    for (i, &b) in bytes.iter().enumerate() {
        push_hex(out, b);
        out.push(b' ');
        if i == 7 {
            out.push(b' ');
        }
    }
    out.resize(out.len() + hex_padding(bytes.len()), b' ');
    out.push(b'|');
    for &b in bytes {
        out.push(if (0x20..0x7f).contains(&b) { b } else { b'.' });
    }
    out.resize(out.len() + 16 - bytes.len(), b' ');
    out.extend_from_slice(b"|\n");
}

fn format_colour(out: &mut Vec<u8>, offset: u64, bytes: &[u8]) {
    out.extend_from_slice(colour::GREEN);
    out.extend_from_slice(format!("{offset:010x}").as_bytes());
    out.extend_from_slice(colour::GREY);
    out.extend_from_slice(b": ");
    for (i, &b) in bytes.iter().enumerate() {
        out.extend_from_slice(if b == 0 {
            colour::GREY
        } else {
            colour::BOLD_BLUE
        });
        push_hex(out, b);
        out.push(b' ');
        if i == 7 {
            out.push(b' ');
        }
    }
    out.extend_from_slice(colour::GREY);
    out.resize(out.len() + hex_padding(bytes.len()), b' ');
    out.extend_from_slice("│".as_bytes());
    for &b in bytes {
        if b.is_ascii_alphanumeric() {
            out.extend_from_slice(colour::BOLD_RED);
            out.push(b);
        } else if (0x20..0x7f).contains(&b) {
            out.extend_from_slice(colour::BOLD_MAGENTA);
            out.push(b);
        } else {
            out.extend_from_slice(colour::GREY);
            out.extend_from_slice("·".as_bytes());
        }
    }
    out.extend_from_slice(colour::GREY);
    out.resize(out.len() + 16 - bytes.len(), b' ');
    out.extend_from_slice("│\n".as_bytes());
    out.extend_from_slice(colour::RESTORE);
}

/// A piece of the export: read it, or it is known to be zero.
#[derive(Debug, Clone, Copy)]
struct Segment {
    offset: u64,
    len: u64,
    zero: bool,
}

/// Splits `0..limit` into segments, asking the server which areas read
/// as zeros when it can tell.
struct Planner<'a> {
    conn: &'a Connection,
    limit: u64,
    next: u64,
    status: bool,
    queue: std::collections::VecDeque<Segment>,
}

impl Planner<'_> {
    async fn plan(&mut self) -> Result<()> {
        let start = self.next;
        let want = (self.limit - start).min(STATUS_WINDOW);
        if self.status {
            match self.conn.block_status(want, start, 0).await {
                Ok(bs) => {
                    let mut off = start;
                    for e in bs.get(CONTEXT_BASE_ALLOCATION).unwrap_or(&[]) {
                        if off >= self.limit {
                            break;
                        }
                        let len = e.length.min(self.limit - off);
                        let zero = e.flags & libnbd::protocol::alloc::ZERO != 0;
                        match self.queue.back_mut() {
                            Some(s) if s.zero == zero && s.offset + s.len == off => s.len += len,
                            _ => self.queue.push_back(Segment {
                                offset: off,
                                len,
                                zero,
                            }),
                        }
                        off += len;
                    }
                    if off > start {
                        self.next = off;
                        return Ok(());
                    }
                }
                Err(libnbd::client::Error::Server { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            // No usable answer: read everything from here on.
            self.status = false;
        }
        self.queue.push_back(Segment {
            offset: start,
            len: want,
            zero: false,
        });
        self.next = start + want;
        Ok(())
    }

    /// The next segment, data split into reads of at most [`CHUNK`].
    async fn next_segment(&mut self) -> Result<Option<Segment>> {
        if self.queue.is_empty() {
            if self.next >= self.limit {
                return Ok(None);
            }
            self.plan().await?;
        }
        let Some(mut s) = self.queue.pop_front() else {
            return Ok(None);
        };
        if !s.zero && s.len > CHUNK {
            self.queue.push_front(Segment {
                offset: s.offset + CHUNK,
                len: s.len - CHUNK,
                zero: false,
            });
            s.len = CHUNK;
        }
        Ok(Some(s))
    }
}

/// Dump `limit` bytes (at most to the end of the export) of `conn`
/// from `offset` to `w`.
pub async fn dump<W: Write>(
    conn: &Connection,
    offset: u64,
    limit: u64,
    color: bool,
    w: W,
) -> Result<W> {
    if offset > conn.size() {
        return Err(anyhow!(
            "--offset {offset} is beyond the end of the export ({} bytes)",
            conn.size()
        ));
    }
    let limit = offset.saturating_add(limit).min(conn.size());
    let planner = Planner {
        conn,
        limit,
        next: offset,
        status: conn.can_meta_context(CONTEXT_BASE_ALLOCATION),
        queue: Default::default(),
    };
    let segments = stream::try_unfold(planner, |mut p| async move {
        Ok::<_, anyhow::Error>(p.next_segment().await?.map(|s| (s, p)))
    });
    let pieces = segments
        .map_ok(|s| async move {
            if s.zero {
                Ok((s, None))
            } else {
                let data = conn.pread_vec(s.len as usize, s.offset, 0).await?;
                Ok::<_, anyhow::Error>((s, Some(data)))
            }
        })
        .try_buffered(IN_FLIGHT);
    let mut pieces = std::pin::pin!(pieces);
    let mut dumper = Dumper::starting_at(w, conn.size(), color, offset);
    while let Some((s, data)) = pieces.try_next().await? {
        match data {
            Some(d) => dumper.data(&d)?,
            None => dumper.zeros(s.len)?,
        }
    }
    Ok(dumper.finish()?)
}

struct Cli {
    offset: u64,
    limit: u64,
    color: bool,
    target: Target,
}

fn command() -> Command {
    let flag = |name: &'static str| Arg::new(name).long(name).action(ArgAction::SetTrue);
    Command::new("nbddump")
        .disable_help_flag(true)
        .disable_version_flag(true)
        .infer_long_args(true)
        .args_override_self(true)
        .arg(flag("help"))
        .arg(flag("version").short('V'))
        .arg(flag("color").aliases(["colors", "colour", "colours"]))
        .arg(flag("no-color").aliases(["no-colors", "no-colour", "no-colours"]))
        .arg(
            Arg::new("length")
                .short('n')
                .long("length")
                .alias("limit")
                .value_name("N")
                .action(ArgAction::Set),
        )
        .arg(
            Arg::new("offset")
                .long("offset")
                .alias("skip")
                .value_name("N")
                .action(ArgAction::Set),
        )
        .arg(
            Arg::new("args")
                .num_args(0..)
                .action(ArgAction::Append)
                .value_parser(clap::value_parser!(OsString)),
        )
}

fn parse(args: Vec<OsString>) -> Action<Cli> {
    match parse_cli(args) {
        Ok(cli) => Action::Run(Box::new(cli)),
        Err(action) => action,
    }
}

/// The command line, or what to do instead of the work.
fn parse_cli(args: Vec<OsString>) -> Result<Cli, Action<Cli>> {
    // Take `[ CMD ARGS ... ]` out first: its arguments are not ours (an
    // unmatched `[` or an empty `[ ]`: the usage, as libnbd's).
    let line = CommandLine::split(args).map_err(|_| Action::Usage(String::new()))?;
    let m = cli::matches(command(), &line.args)?;
    if m.get_flag("help") {
        return Err(Action::Help);
    }
    if m.get_flag("version") {
        return Err(Action::Version);
    }
    let limit = match m.get_one::<String>("length") {
        Some(s) => {
            libnbd::parse_size(s).map_err(|_| anyhow!("could not parse --length option: {s}"))?
        }
        None => u64::MAX,
    };
    let offset = match m.get_one::<String>("offset") {
        Some(s) => {
            libnbd::parse_size(s).map_err(|_| anyhow!("could not parse --offset option: {s}"))?
        }
        None => 0,
    };
    let color = toggle(&m, "color", "no-color").unwrap_or_else(|| io::stdout().is_terminal());
    let positional: Vec<OsString> = m
        .get_many::<OsString>("args")
        .map(|v| v.cloned().collect())
        .unwrap_or_default();
    let target = line.one_target(&positional)?;
    Ok(Cli {
        offset,
        limit,
        color,
        target,
    })
}

/// Run nbddump with these arguments (without the program name);
/// returns the exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let cli = match cli::finish(&TOOL, parse(args)) {
        Ok(cli) => cli,
        Err(status) => return status,
    };
    let rt = match cli::runtime("nbddump", None) {
        Ok(rt) => rt,
        Err(e) => {
            cli::fail("nbddump", &e);
            return 1;
        }
    };
    let r = rt.block_on(async {
        captive::kill_on_signals().context("signal handlers")?;
        let opts = ConnectOptions::new()
            .meta_contexts([CONTEXT_BASE_ALLOCATION])
            .full_info(false);
        let conn = cli.target.connect(&opts).await?;
        let out = io::BufWriter::with_capacity(1 << 20, io::stdout().lock());
        dump(&conn, cli.offset, cli.limit, cli.color, out).await?;
        let _ = conn.disconnect().await;
        Ok::<_, anyhow::Error>(())
    });
    // Stop captive servers before the runtime goes.
    drop(rt);
    match r {
        Ok(()) => 0,
        // Like a C program killed by SIGPIPE (`nbddump ... | head`).
        Err(e) if cli::is_broken_pipe(&e) => 141,
        Err(e) => {
            cli::fail("nbddump", &e);
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump_bytes(data: &[u8], size: u64, color: bool) -> String {
        let mut d = Dumper::new(Vec::new(), size, color);
        d.data(data).unwrap();
        String::from_utf8(d.finish().unwrap()).unwrap()
    }

    #[test]
    fn layout() {
        let mut data = vec![0u8; 8197];
        data[..13].copy_from_slice(b"hello, world!");
        data[0x100..0x103].copy_from_slice(&[1, 2, 3]);
        data[0x1000..0x1040].fill(0x41);
        data[0x2004] = 0x21;
        let expected = "\
0000000000: 68 65 6c 6c 6f 2c 20 77  6f 72 6c 64 21 00 00 00 |hello, world!...|
0000000010: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|
*
0000000100: 01 02 03 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|
0000000110: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|
*
0000001000: 41 41 41 41 41 41 41 41  41 41 41 41 41 41 41 41 |AAAAAAAAAAAAAAAA|
*
0000001040: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|
*
0000002000: 00 00 00 00 21                                   |....!           |
";
        assert_eq!(dump_bytes(&data, 8197, false), expected);
        // Fed in odd pieces, or with zeros as runs: the same.
        let mut d = Dumper::new(Vec::new(), 8197, false);
        for piece in data.chunks(7) {
            if piece.iter().all(|&b| b == 0) {
                d.zeros(piece.len() as u64).unwrap();
            } else {
                d.data(piece).unwrap();
            }
        }
        assert_eq!(String::from_utf8(d.finish().unwrap()).unwrap(), expected);
    }

    #[test]
    fn last_line_rules() {
        // The line reaching the end of the export is always printed...
        assert_eq!(
            dump_bytes(&[0; 33], 33, false),
            "0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n*\n\
             0000000020: 00                                               |.               |\n"
        );
        assert_eq!(
            dump_bytes(&[0; 32], 32, false).lines().count(),
            2,
            "no * when the repeat is the last line"
        );
        // ... but not the last line of a dump cut short with --length,
        // which is compared padded with zeros.
        assert_eq!(
            dump_bytes(&[0; 17], 1 << 20, false),
            "0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n*\n"
        );
        assert_eq!(
            dump_bytes(&[0x41; 24], 1 << 20, false),
            "0000000000: 41 41 41 41 41 41 41 41  41 41 41 41 41 41 41 41 |AAAAAAAAAAAAAAAA|\n\
             0000000010: 41 41 41 41 41 41 41 41                          |AAAAAAAA        |\n"
        );
        let mut d = Dumper::new(Vec::new(), 1 << 40, false);
        d.zeros(1 << 40).unwrap();
        assert_eq!(
            String::from_utf8(d.finish().unwrap()).unwrap(),
            "0000000000: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n*\n\
             fffffffff0: 00 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00 |................|\n"
        );
    }

    #[test]
    fn colours() {
        let s = dump_bytes(b"\0a,", 3, true);
        let expected = format!(
            "\x1b[22;32m0000000000\x1b[22;90m: \x1b[22;90m00 \x1b[1;34m61 \x1b[1;34m2c \
             \x1b[22;90m{}│\x1b[22;90m·\x1b[1;31ma\x1b[1;35m,\x1b[22;90m{}│\n\x1b[0m",
            " ".repeat(40),
            " ".repeat(13)
        );
        assert_eq!(s, expected);
    }
}
