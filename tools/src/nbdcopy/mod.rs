//! `nbdcopy`: copy to and from an NBD server, compatible with libnbd
//! 1.14's.
//!
//! ```text
//! nbdcopy nbd://example.com local.img
//! nbdcopy -p local.img "nbd+unix:///?socket=/tmp/sock"
//! nbdcopy -- [ qemu-nbd -f qcow2 disk.qcow2 ] - | hexdump -C
//! cat disk1 disk2 | nbdcopy -- - [ qemu-nbd -f qcow2 output.qcow2 ]
//! nbdcopy nbd://server null:
//! ```
//!
//! SOURCE and DESTINATION are each an NBD URI, `[ CMD ARGS ... ]` (a
//! server run as a subprocess with socket activation; this build's own
//! `nbdkit` is served in-process instead, `inprocess.rs`), a local file
//! or block device, or `-` (stdin or stdout); DESTINATION may also be
//! `null:`. Each kind is an `Endpoint` (`endpoint.rs`) in its own file
//! (`nbd.rs`, `inprocess.rs`, `file.rs`, `pipe.rs`, `null.rs`); the copy strategies
//! (`multi.rs` by default, `synch.rs` for `--synchronous`) know only
//! that trait.
//!
//! Options, as libnbd's: `-C`/`--connections` (multi-conn, default 4
//! where the servers allow it, at most one per thread, each on its own
//! thread: `lanes.rs`), `-R`/`--requests`
//! (in flight per connection), `--request-size` (default 256K; 2M when
//! writing to a server without multi-conn, such as qemu-nbd),
//! `--queue-size` (bytes in flight per connection), `-T`/`--threads`
//! (default: the number of CPUs), `-S`/`--sparse` (zero detection block
//! size, default 4096 or the destination's preferred block size; 0 turns
//! it off), `--allocated`, `--no-extents`,
//! `--destination-is-zero`/`--target-is-zero`, `--flush`,
//! `--synchronous`, `-p`/`--progress` or `--progress=FD`, `-v`, `-V`;
//! and libnbd 1.24's `--blkhash[=DIGEST[/SIZE]]` and
//! `--blkhash-file=FILE`: the blkhash-construction digest of everything
//! copied (zero ranges hashed without reading them), also to `null:`,
//! printed in hex (`blkhash.rs` documents the construction).
//!
//! Ours only: `--shallow` copies the top layer of a backing chain and
//! nothing else (libvirt's `blockcopy --shallow`, for migrating a VM
//! whose backing images are already at the destination):
//!
//! ```text
//! nbdcopy --shallow -- [ qemu-nbd -r -A -f qcow2 top.qcow2 ] \
//!     [ nbdkit --filter=qcow2 file new.qcow2 create=true size=10G backing=base.qcow2 backing-format=qcow2 ]
//! qemu-img create -f qcow2 -b base.qcow2 -F qcow2 new.qcow2 10G
//! nbdcopy --shallow -- "nbd+unix:///?socket=top.sock" [ qemu-nbd -f qcow2 new.qcow2 ]
//! ```
//!
//! The source must be an NBD server offering `qemu:allocation-depth`
//! (`qemu-nbd -A`, or our `nbdkit --filter=qcow2`), or the copy fails
//! before anything is written. Only the ranges at depth 1 (held by the
//! top image itself) are copied; unallocated ranges and those held by
//! backing files are not touched in the destination, which should be an
//! overlay over the same backing chain (they show through it). Inside
//! the top layer, zeroes (zeroed clusters, such as `qemu-io -c 'write
//! -z'` makes over backing data, and holes) are written as zero
//! requests, always, even where the destination reads as zeroes already:
//! the destination is not blank, its backing shows through, and its
//! zero clusters must hide it as the top's do. `-p`, `-C`, `-R`,
//! `--synchronous`, `--allocated`, `--flush` and `-S` work as usual
//! (skipped ranges count as done for the progress bar). Refused with
//! `--shallow`: `--blkhash` (a hash of the top layer alone is not the
//! hash of any disk, and hashing the whole source would read what is not
//! copied), `--destination-is-zero` (the destination is an overlay), and
//! `--no-extents`. The destination may also be a local file or block
//! device only if it already holds the disk below the top layer (say, an
//! earlier full copy of the backing file, brought up to date): a missing
//! or empty file is refused, as a raw file is no overlay and the copy
//! would hold the top layer's data alone. `-` (stdout) is refused;
//! `null:` is allowed.
//!
//! Without `-R` and `--queue-size`, what is kept in flight suits the
//! endpoints, within libnbd's defaults (64 requests, 16M): those
//! for a server across a network, 8 requests for one on a Unix socket
//! (which answers in microseconds; more requests only spread the copy
//! over buffers that no longer fit in the CPU cache), 4 between local
//! files.
//!
//! A destination smaller than the source is an error before anything is
//! copied (a regular file is resized to the source instead). Any failed
//! read or write stops the copy with a message naming the endpoint, the
//! offset and the error, and exit status 1.

mod alloc;
pub mod blkhash;
mod endpoint;
mod file;
mod inprocess;
mod lanes;
mod multi;
mod nbd;
mod null;
mod ops;
mod pipe;
mod progress;
mod synch;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches, Parser};
use libnbd::captive::{self, Target};
use libnbd::uri::Uri;

pub use alloc::PageAligned;
use endpoint::{describe, Endpoint, OpError};
use file::{FileEndpoint, Opened};
use inprocess::InProcessEndpoint;
use lanes::Lanes;
use nbd::NbdEndpoint;
use null::NullEndpoint;
use ops::{Copier, Settings};
use pipe::PipeEndpoint;
use progress::{Mode, Progress, Reporter};

use anyhow::{anyhow, Context, Result};

use crate::cli::{self, Action, CommandLine, Tool};

const TOOL: Tool = Tool {
    name: "nbdcopy",
    usage: USAGE,
    version: || cli::libnbd_version("nbdcopy"),
    long_options: &[
        "--help",
        "--allocated",
        "--blkhash",
        "--blkhash-file",
        "--connections",
        "--destination-is-zero",
        "--flush",
        "--no-extents",
        "--progress",
        "--queue-size",
        "--request-size",
        "--requests",
        "--shallow",
        "--sparse",
        "--synchronous",
        "--target-is-zero",
        "--threads",
        "--verbose",
        "--version",
    ],
    short_options: &["-C", "-p", "-R", "-S", "-T", "-v", "-V"],
};

/// Default `--request-size`.
const REQUEST_SIZE: u64 = 256 * 1024;
/// Smallest and largest `--request-size`.
const MIN_REQUEST_SIZE: u64 = 4096;
const MAX_REQUEST_SIZE: u64 = 32 * 1024 * 1024;
/// Largest default `-R` and `--queue-size` (libnbd's defaults).
const REQUESTS: usize = 64;
const QUEUE_SIZE: u64 = 16 * 1024 * 1024;
/// Default `--sparse`.
const SPARSE_SIZE: u64 = 4096;

const USAGE: &str = "
Copy to and from an NBD server:

    nbdcopy [--allocated] [-C N|--connections=N]
            [--destination-is-zero|--target-is-zero] [--flush]
            [--no-extents] [-p|--progress|--progress=FD]
            [--queue-size=N] [--request-size=N] [-R N|--requests=N]
            [-S N|--sparse=N] [--synchronous] [-T N|--threads=N]\x20
            [-v|--verbose]
            SOURCE DESTINATION

    SOURCE, DESTINATION := - | FILE | DEVICE | NBD-URI | [ CMD ARGS ... ]
    DESTINATION += null:

Only the top layer of a qcow2 chain, into an overlay (ours):

    nbdcopy --shallow [...] NBD-SOURCE DESTINATION

Block hash of what is copied (libnbd 1.24's):

    nbdcopy --blkhash[=DIGEST[/SIZE]] [--blkhash-file=FILE] [...]
            SOURCE DESTINATION

Other options:

    nbdcopy --help
    nbdcopy -V|--version

Examples:

    nbdcopy nbd://example.com local.img
    nbdcopy local.img nbd://example.com
    nbdcopy nbd://example.com - | file -
    nbdcopy --blkhash nbd://example.com null:
    cat disk1 disk2 | nbdcopy -- - [ qemu-nbd -f qcow2 output.qcow2 ]

Please read the nbdcopy(1) manual page for full usage.

";

/// The command line (help text is [`USAGE`]).
#[derive(Parser, Debug)]
#[command(
    name = "nbdcopy",
    infer_long_args = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct Cli {
    /// Write a fully allocated destination: zeroes as allocated blocks.
    #[arg(long)]
    allocated: bool,
    /// `--blkhash` (sha256, 64K blocks) or `--blkhash=DIGEST[/SIZE]`.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "")]
    blkhash: Option<String>,
    /// Write the block hash to FILE instead of stdout.
    #[arg(long = "blkhash-file")]
    blkhash_file: Option<PathBuf>,
    /// Most NBD connections per server (multi-conn), default 4.
    #[arg(short = 'C', long = "connections")]
    connections: Option<String>,
    /// The destination already reads as zeroes: skip zero ranges.
    #[arg(long = "destination-is-zero", alias = "target-is-zero")]
    destination_is_zero: bool,
    /// Flush the destination to permanent storage at the end.
    #[arg(long)]
    flush: bool,
    /// Print usage and exit.
    #[arg(long)]
    help: bool,
    /// Read everything, ignoring the source's extents.
    #[arg(long = "no-extents")]
    no_extents: bool,
    /// Draw a progress bar on stderr.
    #[arg(short = 'p')]
    p: bool,
    /// `--progress` (a bar) or `--progress=FD` (`N/100` lines on FD).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "")]
    progress: Option<String>,
    /// Bytes of requests in flight per connection (at most 16M unless
    /// given).
    #[arg(long = "queue-size")]
    queue_size: Option<String>,
    /// Largest request, a power of 2 from 4K to 32M, default 256K.
    #[arg(long = "request-size")]
    request_size: Option<String>,
    /// Requests in flight per connection (at most 64 unless given).
    #[arg(short = 'R', long = "requests")]
    requests: Option<String>,
    /// Copy only the source's top layer (`qemu:allocation-depth` 1).
    #[arg(long)]
    shallow: bool,
    /// Zero detection block size (0: none).
    #[arg(short = 'S', long = "sparse")]
    sparse: Option<String>,
    /// One request at a time, in order.
    #[arg(long)]
    synchronous: bool,
    /// Threads (0: one per CPU).
    #[arg(short = 'T', long = "threads")]
    threads: Option<String>,
    /// Print what is being done.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Print the version and exit.
    #[arg(short = 'V', long = "version")]
    version: bool,
    /// SOURCE and DESTINATION (`[ CMD ARGS ... ]` spans several words).
    args: Vec<OsString>,
}

/// The options, checked and with defaults applied.
#[derive(Debug, Clone)]
struct Options {
    allocated: bool,
    /// `--blkhash`, and where to write it (`None`: stdout).
    blkhash: Option<(blkhash::Spec, Option<PathBuf>)>,
    connections: usize,
    destination_is_zero: bool,
    flush: bool,
    extents: bool,
    progress: Mode,
    /// `--queue-size`; `None`: what the requests in flight take, up to
    /// libnbd's 16M.
    queue_size: Option<u64>,
    /// `--request-size`; `None`: 256K, or what the destination asks for.
    request_size: Option<u64>,
    /// `-R`; `None`: what the endpoints want, up to libnbd's 64.
    requests: Option<usize>,
    /// `--shallow`: only the source's top layer.
    shallow: bool,
    /// `None`: the default (raised to the destination's block size).
    sparse: Option<u64>,
    synchronous: bool,
    threads: usize,
    verbose: bool,
}

/// A copy to do: its options, source and destination.
type Job = (Options, Spec, Spec);

/// What a SOURCE or DESTINATION argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Spec {
    Nbd(Target),
    Stdio,
    Null,
    Path(PathBuf),
}

/// Run nbdcopy with these arguments (without argv\[0\]); returns the
/// exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let job = match cli::finish(&TOOL, parse(args)) {
        Ok(job) => job,
        Err(status) => return status,
    };
    let (opts, src, dst) = *job;
    match run(opts, src, dst) {
        Ok(()) => 0,
        Err(e) => {
            cli::fail("nbdcopy", &e);
            1
        }
    }
}

fn count(name: &str, v: Option<&String>, default: usize, zero_ok: bool) -> Result<usize, String> {
    let Some(s) = v else {
        return Ok(default);
    };
    match s.trim().parse::<u32>() {
        Ok(n) if n > 0 || zero_ok => Ok(n as usize),
        _ => Err(format!("--{name}: could not parse: {s}")),
    }
}

fn size(name: &str, v: Option<&String>) -> Result<Option<u64>, String> {
    v.map(|s| libnbd::parse_size(s).map_err(|_| format!("--{name}: could not parse: {s}")))
        .transpose()
}

fn options(cli: &Cli) -> Result<Options, String> {
    let connections = count("connections", cli.connections.as_ref(), 4, false)?;
    let requests = match cli.requests {
        Some(_) => Some(count("requests", cli.requests.as_ref(), REQUESTS, false)?),
        None => None,
    };
    let threads = count("threads", cli.threads.as_ref(), 0, true)?;
    let request_size = size("request-size", cli.request_size.as_ref())?;
    if request_size.is_some_and(|r| {
        !r.is_power_of_two() || !(MIN_REQUEST_SIZE..=MAX_REQUEST_SIZE).contains(&r)
    }) {
        return Err(format!(
            "--request-size: must be a power of 2 within {MIN_REQUEST_SIZE}-{MAX_REQUEST_SIZE}"
        ));
    }
    let queue_size = size("queue-size", cli.queue_size.as_ref())?;
    let sparse = size("sparse", cli.sparse.as_ref())?;
    if let Some(s) = sparse {
        if s != 0 && (!s.is_power_of_two() || s < 512) {
            return Err("--sparse: must be a power of 2 and >= 512".into());
        }
    }
    let progress = match (&cli.progress, cli.p) {
        (Some(fd), _) if !fd.is_empty() => match fd.trim().parse::<i32>() {
            Ok(n) if n >= 0 => Mode::Fd(n),
            _ => return Err(format!("--progress: could not parse: {fd}")),
        },
        (Some(_), _) | (None, true) => Mode::Bar,
        (None, false) => Mode::Off,
    };
    let blkhash = match (&cli.blkhash, &cli.blkhash_file) {
        (Some(v), file) => Some((blkhash::Spec::parse(v)?, file.clone())),
        // The file alone: the default hash.
        (None, Some(file)) => Some((blkhash::Spec::parse("")?, Some(file.clone()))),
        (None, None) => None,
    };
    Ok(Options {
        allocated: cli.allocated,
        blkhash,
        connections,
        destination_is_zero: cli.destination_is_zero,
        flush: cli.flush,
        extents: !cli.no_extents,
        progress,
        queue_size,
        request_size,
        requests,
        shallow: cli.shallow,
        sparse,
        synchronous: cli.synchronous,
        threads,
        verbose: cli.verbose,
    })
}

/// What one SOURCE or DESTINATION word names.
fn spec(line: &CommandLine, word: &OsString) -> Result<Spec, String> {
    if let Some(cmd) = line.command(word) {
        return Ok(Spec::Nbd(Target::Command(cmd.to_vec())));
    }
    let s = word.to_string_lossy();
    if s == "-" {
        return Ok(Spec::Stdio);
    }
    if null::is_null(&s) {
        return Ok(Spec::Null);
    }
    if Uri::is_nbd_uri(&s) {
        let (t, _) = Target::from_args(std::slice::from_ref(word)).map_err(|e| e.to_string())?;
        return Ok(Spec::Nbd(t));
    }
    Ok(Spec::Path(PathBuf::from(word)))
}

fn parse(args: Vec<OsString>) -> Action<Job> {
    // Take `[ CMD ARGS ... ]` out first: its arguments are not ours.
    let line = match CommandLine::split(args) {
        Ok(l) => l,
        // An unmatched `[` or an empty `[ ]`: the usage, as libnbd's.
        Err(_) => return Action::Usage(String::new()),
    };
    let m = match cli::matches(Cli::command(), &line.args) {
        Ok(m) => m,
        Err(action) => return action,
    };
    let cli = match Cli::from_arg_matches(&m) {
        Ok(c) => c,
        Err(e) => return Action::Usage(cli::clap_message(&e, &line.args)),
    };
    if cli.help {
        return Action::Help;
    }
    if cli.version {
        return Action::Version;
    }
    let opts = match options(&cli) {
        Ok(o) => o,
        // A bad option value: only the message, as libnbd's nbdcopy.
        Err(msg) => return Action::Error(anyhow!(msg)),
    };
    let [a, b] = &cli.args[..] else {
        return Action::Usage(String::new());
    };
    let (src, dst) = match (spec(&line, a), spec(&line, b)) {
        (Ok(src), Ok(dst)) => (src, dst),
        (Err(m), _) | (_, Err(m)) => return Action::Usage(m),
    };
    if matches!(opts.blkhash, Some((_, None))) && dst == Spec::Stdio {
        return Action::Error(anyhow!(
            "--blkhash: the destination is stdout: write the hash with --blkhash-file"
        ));
    }
    // `null:` is a destination only; as a source it is a file name.
    let src = if src == Spec::Null {
        Spec::Path(PathBuf::from("null:"))
    } else {
        src
    };
    if opts.shallow {
        if let Err(msg) = shallow_check(&opts, &src, &dst) {
            return Action::Error(anyhow!("--shallow: {msg}"));
        }
    }
    Action::Run(Box::new((opts, src, dst)))
}

/// What `--shallow` cannot go with (see the module doc).
fn shallow_check(opts: &Options, src: &Spec, dst: &Spec) -> Result<(), &'static str> {
    if !matches!(src, Spec::Nbd(_)) {
        return Err(
            "the source must be an NBD server offering qemu:allocation-depth \
             (qemu-nbd -A, or nbdkit --filter=qcow2)",
        );
    }
    if *dst == Spec::Stdio {
        return Err("the destination cannot be a stream: what is not copied is left as it is");
    }
    if opts.blkhash.is_some() {
        return Err("--blkhash hashes a whole disk, and a shallow copy is not one");
    }
    if opts.destination_is_zero {
        return Err(
            "--destination-is-zero: the destination is an overlay, whose \
             backing file shows through",
        );
    }
    if !opts.extents {
        return Err("--no-extents: the copy needs the source's extents");
    }
    Ok(())
}

/// Open one side (`shallow`: the source of `--shallow`).
async fn open(spec: Spec, write: bool, extents: bool, shallow: bool) -> Result<Box<dyn Endpoint>> {
    let file = |name: String, opened: Opened| -> Box<dyn Endpoint> {
        match opened {
            Opened::File(f) => Box::new(f),
            Opened::Stream(f) => Box::new(PipeEndpoint::new(name, f)),
        }
    };
    // A captive nbdkit of ours, served in-process (inprocess.rs).
    let ours = match &spec {
        Spec::Nbd(Target::Command(argv)) if !shallow => {
            crate::nbdkit::in_process(argv).map(|server| (nbd::command_name(argv), server))
        }
        _ => None,
    };
    if let Some((name, server)) = ours {
        let server = server.map_err(|e| {
            // As the spawned server would say it, then why we stop.
            libnbd::elog!("nbdkit: error: {}", cli::error_message(&e));
            anyhow!("{name}: the captive nbdkit could not start")
        })?;
        let e = InProcessEndpoint::open(name, server, extents).await;
        return Ok(Box::new(e.map_err(|e| anyhow!(describe(&e)))?));
    }
    Ok(match spec {
        Spec::Nbd(t) => Box::new(
            NbdEndpoint::open(t, extents, shallow)
                .await
                .map_err(|e| anyhow!(describe(&e)))?,
        ),
        Spec::Null => Box::new(NullEndpoint),
        Spec::Stdio => {
            let f = pipe::std_file(write).map_err(|e| anyhow!("-: {}", describe(&e)))?;
            let opened = FileEndpoint::from_file("-".into(), f)
                .map_err(|e| anyhow!("-: {}", describe(&e)))?;
            file("-".into(), opened)
        }
        Spec::Path(p) => {
            let name = p.display().to_string();
            let opened =
                FileEndpoint::open(&p, write).map_err(|e| anyhow!("{name}: {}", describe(&e)))?;
            file(name, opened)
        }
    })
}

fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["", "K", "M", "G", "T", "P"];
    let mut i = 0;
    let mut v = n;
    while i + 1 < UNITS.len() && v >= 1024 && v & 1023 == 0 {
        v /= 1024;
        i += 1;
    }
    format!("{v}{}", UNITS[i])
}

fn describe_endpoint(side: &str, e: &dyn Endpoint) {
    libnbd::elog!("nbdcopy: {side}: {} \"{}\"", e.kind(), e.name());
    let size = match e.size() {
        Some(s) => format!("{s} ({})", human(s)),
        None => "unknown (stream)".into(),
    };
    libnbd::elog!(
        "nbdcopy: {side}: size={size}, preferred block size={}",
        e.preferred_block_size()
    );
}

fn run(opts: Options, src: Spec, dst: Spec) -> Result<()> {
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let rt = cli::runtime("nbdcopy", Some(threads))?;
    rt.block_on(async move {
        captive::kill_on_signals().context("signal handlers")?;
        // On a worker thread, like the tasks it starts and waits for
        // (block_on's own thread is not one: every wakeup would cross).
        tokio::spawn(copy(opts, threads, src, dst))
            .await
            .map_err(|e| anyhow!("internal error: {e}"))?
    })
}

async fn copy(opts: Options, threads: usize, src: Spec, dst: Spec) -> Result<()> {
    if let (true, Spec::Path(p)) = (opts.shallow, &dst) {
        // A file made now (or empty) would end up with the top layer's
        // data alone: not the disk. (Checked before opening, which
        // would create it.)
        let empty = std::fs::metadata(p).map_or(true, |m| m.is_file() && m.len() == 0);
        if empty {
            return Err(anyhow!(
                "--shallow: {}: the destination file is missing or empty; it must \
                 hold the layers below the source's top already (or be an NBD \
                 overlay over them)",
                p.display()
            ));
        }
    }
    let mut src = open(src, false, opts.extents, opts.shallow).await?;
    let mut dst = open(dst, true, opts.extents, false).await?;
    if dst.is_read_only() {
        return Err(anyhow!("{}: the destination is read-only", dst.name()));
    }

    // Connections: several only where both sides can take them. As in
    // libnbd's, each NBD connection has a thread of its own (a lane,
    // see lanes.rs): one per thread, up to `-C`. With a single thread,
    // `-C` connections are used in turn from it instead.
    let mut connections = opts.connections.max(1);
    if opts.synchronous || !src.can_multi_conn() || !dst.can_multi_conn() {
        connections = 1;
    }
    let mut lanes = None;
    if connections.min(threads) > 1
        && !src.is_stream()
        && !dst.is_stream()
        && (src.takes_lanes() || dst.takes_lanes())
    {
        let l = Lanes::start(connections.min(threads))
            .map_err(|e| anyhow!("cannot start threads: {e}"))?;
        let (a, b) = tokio::join!(src.start_lanes(&l), dst.start_lanes(&l));
        a.and(b).map_err(|e| anyhow!(describe(&e)))?;
        lanes = Some(l);
    }
    let width = match &lanes {
        Some(l) => l.len(),
        None => {
            let (a, b) = tokio::join!(
                src.start_multi_conn(connections),
                dst.start_multi_conn(connections)
            );
            let opened = a.map_err(|e| anyhow!(describe(&e)))?;
            let opened = opened.max(b.map_err(|e| anyhow!(describe(&e)))?);
            // What is kept in flight scales with the NBD connections,
            // or with the threads working on local endpoints.
            opened.max(connections.min(threads))
        }
    };

    // Sizes: a regular file destination takes the source's size; any
    // other must be large enough.
    if let Some(size) = src.size() {
        if dst.is_resizable() {
            dst.truncate(size)
                .await
                .map_err(|e| OpError::new(&*dst, "truncate", None, e))?;
        } else if matches!(dst.size(), Some(d) if d < size) {
            return Err(anyhow!(
                "error: destination size is smaller than source size"
            ));
        }
    }

    let mut request_size = opts
        .request_size
        .or_else(|| dst.write_request_size())
        .unwrap_or(REQUEST_SIZE);
    for limit in [src.max_request_size(), dst.max_request_size()]
        .into_iter()
        .flatten()
    {
        if limit >= 512 && limit < request_size {
            // The largest power of 2 within the server's maximum.
            request_size = 1 << (63 - limit.leading_zeros());
        }
    }
    let sparse_size = match opts.sparse {
        Some(s) => s,
        None => SPARSE_SIZE.max(dst.preferred_block_size()),
    };
    let dst_stream = dst.is_stream();
    let settings = Settings {
        request_size,
        sparse_size,
        allocated: opts.allocated,
        skip_zeroes: !dst_stream && (opts.destination_is_zero || dst.is_zero()),
        zero_all: opts.shallow,
    };
    // In flight per connection: as asked, or as the endpoints suit.
    let requests = opts
        .requests
        .unwrap_or_else(|| src.queue_depth().max(dst.queue_depth()).min(REQUESTS));
    let queue_size = opts.queue_size.unwrap_or_else(|| {
        (requests as u64)
            .saturating_mul(request_size)
            .min(QUEUE_SIZE)
    });
    if opts.verbose {
        describe_endpoint("src", &*src);
        describe_endpoint("dst", &*dst);
        libnbd::elog!(
            "nbdcopy: connections={width} requests={} threads={threads} synchronous={} \
             request-size={request_size} queue-size={} sparse={sparse_size} extents={} \
             destination-is-zero={}",
            requests,
            opts.synchronous,
            queue_size,
            opts.extents && src.can_extents(),
            settings.skip_zeroes,
        );
    }

    let progress = Arc::new(Progress::new(src.size()));
    let reporter = Reporter::start(opts.progress, progress.clone());
    let src: Arc<dyn Endpoint> = Arc::from(src);
    let dst: Arc<dyn Endpoint> = Arc::from(dst);
    let mut c = Copier::new(src.clone(), dst.clone(), settings, progress);
    let hasher = opts
        .blkhash
        .as_ref()
        .map(|(spec, _)| Arc::new(blkhash::BlockHasher::new(spec)));
    c.hasher = hasher.clone();
    let c = Arc::new(c);
    let result = if opts.synchronous {
        synch::copy(c.clone(), opts.extents).await
    } else {
        // The budget is per connection: each lane has its own.
        let per = if lanes.is_some() { 1 } else { width };
        let limits = multi::Limits {
            requests: requests.saturating_mul(per),
            queue_bytes: queue_size.saturating_mul(per as u64),
        };
        multi::copy(c.clone(), limits, opts.extents, lanes.as_ref()).await
    };
    let result = match result {
        Ok(copied) => finish(&*src, &*dst, copied, opts.flush)
            .await
            .map(|()| copied),
        Err(e) => Err(e),
    };
    reporter.finish(result.is_ok()).await;
    let copied = result?;
    if let (Some(h), Some((_, file))) = (hasher, &opts.blkhash) {
        let line = format!(
            "{}\n",
            blkhash::hex(&h.finish(copied).map_err(|e| anyhow!(e))?)
        );
        match file {
            Some(f) => std::fs::write(f, line)
                .with_context(|| format!("--blkhash-file: {}", f.display()))?,
            None => {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                out.write_all(line.as_bytes())
                    .and_then(|()| out.flush())
                    .context("--blkhash: stdout")?;
            }
        }
    }
    Ok(())
}

/// After the data: fix the size of a destination file fed by a stream,
/// flush if asked, and close both sides cleanly.
async fn finish(
    src: &dyn Endpoint,
    dst: &dyn Endpoint,
    copied: u64,
    flush: bool,
) -> Result<(), OpError> {
    if src.size().is_none() && dst.is_resizable() {
        dst.truncate(copied)
            .await
            .map_err(|e| OpError::new(dst, "truncate", None, e))?;
    }
    if flush {
        dst.flush()
            .await
            .map_err(|e| OpError::new(dst, "flush", None, e))?;
    }
    src.close()
        .await
        .map_err(|e| OpError::new(src, "close", None, e))?;
    dst.close()
        .await
        .map_err(|e| OpError::new(dst, "close", None, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn copy_of(s: &str) -> (Options, Spec, Spec) {
        match parse(words(s)) {
            Action::Run(job) => *job,
            _ => panic!("{s}: not a copy"),
        }
    }

    fn usage(s: &str) -> String {
        match parse(words(s)) {
            Action::Usage(m) => m,
            _ => panic!("{s}: not a usage error"),
        }
    }

    fn bad_option(s: &str) -> String {
        match parse(words(s)) {
            Action::Error(e) => e.to_string(),
            _ => panic!("{s}: not a bad option value"),
        }
    }

    #[test]
    fn defaults_are_libnbds() {
        let (o, src, dst) = copy_of("a.img null:");
        assert_eq!(o.connections, 4);
        assert_eq!(o.requests, None);
        assert_eq!(o.request_size, None);
        assert_eq!(o.queue_size, None);
        assert_eq!(o.sparse, None);
        assert_eq!(o.threads, 0);
        assert_eq!(o.progress, Mode::Off);
        assert!(o.extents && !o.allocated && !o.synchronous);
        assert_eq!(src, Spec::Path("a.img".into()));
        assert_eq!(dst, Spec::Null);
    }

    #[test]
    fn captive_and_uri_specs() {
        let (_, src, dst) = copy_of("-- [ qemu-nbd -f qcow2 x.qcow2 ] -");
        assert!(matches!(src, Spec::Nbd(Target::Command(ref v)) if v.len() == 4));
        assert_eq!(dst, Spec::Stdio);
        let (_, src, dst) = copy_of("nbd://example.com [ nbdkit memory 1G ]");
        assert!(matches!(src, Spec::Nbd(Target::Uri(_))));
        assert!(matches!(dst, Spec::Nbd(Target::Command(_))));
        // null: as a source is a file name.
        let (_, src, _) = copy_of("null: out");
        assert_eq!(src, Spec::Path("null:".into()));
    }

    #[test]
    fn options_are_checked() {
        // A bad value: the message alone, as libnbd's (no usage text).
        assert!(bad_option("--request-size=1000 a b")
            .starts_with("--request-size: must be a power of 2"));
        assert_eq!(
            bad_option("-S 100 a b"),
            "--sparse: must be a power of 2 and >= 512"
        );
        assert_eq!(bad_option("-C 0 a b"), "--connections: could not parse: 0");
        assert_eq!(bad_option("-R x a b"), "--requests: could not parse: x");
        assert_eq!(usage("a"), "");
        assert_eq!(usage("a b c"), "");
        let (o, _, _) = copy_of("--progress=3 -S 0 --request-size=1M -T 1 a b");
        assert_eq!(o.progress, Mode::Fd(3));
        assert_eq!(o.sparse, Some(0));
        assert_eq!(o.request_size, Some(1 << 20));
        assert_eq!(o.threads, 1);
        let (o, _, _) = copy_of("--progress a b");
        assert_eq!(o.progress, Mode::Bar);
        let (o, _, _) = copy_of("a b -p --target-is-zero");
        assert_eq!(o.progress, Mode::Bar);
        assert!(o.destination_is_zero);
    }
}
