//! `nbdinfo`: display information and metadata about NBD servers and
//! exports, compatible with libnbd 1.14's nbdinfo (same options, same
//! text and `--json` output, same exit codes).
//!
//! ```text
//! nbdinfo [--json] NBD                      report on the export
//! nbdinfo --size [--json] NBD               its size in bytes
//! nbdinfo --is read-only|rotational|tls NBD exit status 0 (true) or 2 (false)
//! nbdinfo --can connect|read|write|trim|zero|fast-zero|df|fua|flush|
//!               multi-conn|cache|structured-reply NBD
//! nbdinfo --map[=CONTEXT] [--map=CONTEXT ...] [--totals] [--json]
//!         [--offset=N] [--length=N] NBD
//! nbdinfo --uri NBD                         the export's URI (libnbd 1.20+)
//! nbdinfo --isnt|--cannot|--hasnt FLAG NBD  the inverse test (libnbd 1.16+)
//! nbdinfo -L|--list [--json] NBD            every export of the server
//! ```
//!
//! `NBD` is an NBD URI (`nbd://host:port/export`,
//! `nbd+unix:///export?socket=PATH`, `nbd+ssh://user@host/?socket=PATH`
//! through ssh as libnbd 1.22, ...) or a server to run for the
//! occasion, `[ qemu-nbd -f qcow2 disk.qcow2 ]`, which is stopped
//! before nbdinfo exits (put `--` before the `[` if in doubt).
//!
//! Other options: `--content`/`--no-content` (describe the first
//! sectors of each export, the default except with `--list`; see
//! [`content`]), `--color`/`--no-color` (ANSI colours, by default when
//! stdout is a terminal), `--json`, `--help`, `-V`/`--version`.
//!
//! Errors print one line, `nbdinfo: ...`, on stderr and exit 1. A flag
//! test (`--can`, `--is`, `--has`) exits 0 if true and 2 if false;
//! its negation (`--cannot`, `--isnt`, `--hasnt`, as newer libnbd's)
//! 0 if false and 2 if true. The flags are the same for all six, plus
//! `extended-headers` (negotiated extended headers, as libnbd 1.18+).
//! `--uri` prints the URI of the export, as the `uri:` line of the
//! report (not for a server run as a subprocess, which has none).
//!
//! `--map` may be given several times (`--map --map=qemu:allocation-depth`):
//! one connection negotiates every context and the maps are printed in
//! turn, in the order given, each preceded by a line `context: NAME`
//! when there is more than one; with `--json` they are one object with
//! an array per context, `{ "base:allocation": [...], ... }` (see
//! [`map`]). `--offset=N` and `--length=N` (ours, after our nbddump's:
//! libnbd's nbdinfo has no such options) map only that range of the
//! export, extents clipped to it; an offset past the end of the export
//! is an error; `--totals` then gives percentages of the range.
//!
//! Examples:
//!
//! ```text
//! $ nbdinfo nbd://localhost
//! $ nbdinfo --json -- [ nbdkit memory 1G ] | jq .exports[0].\"export-size\"
//! $ nbdinfo --map=qemu:dirty-bitmap:bm0 -- [ qemu-nbd -f qcow2 -B bm0 disk.qcow2 ]
//! $ nbdinfo --can trim nbd+unix:///?socket=/tmp/sock && echo trim works
//! ```

pub mod content;
mod fmt;
pub mod map;
mod show;

use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Arg, ArgAction, Command};
use libnbd::captive::{self, Target};
use libnbd::client::{ConnectOptions, Connection};

use crate::cli::{self, last_index, toggle, Action, CommandLine, Tool};
use show::{ExportReport, Header, Style};

/// Upstream's usage text, with our further options under "Other options".
const USAGE: &str = "
Display information and metadata about NBD servers and exports:

    nbdinfo [--json] NBD-URI | [ CMD ARGS ... ]
    nbdinfo --size [--json] NBD-URI | [ CMD ARGS ... ]
    nbdinfo --is read-only|rotational NBD-URI | [ CMD ARGS ... ]
    nbdinfo --can cache|connect|... NBD-URI | [ CMD ARGS ... ]
    nbdinfo --map [--totals] [--json] NBD-URI | [ CMD ARGS ... ]
    nbdinfo -L|--list [--json] NBD-URI | [ CMD ARGS ... ]

Newer libnbd's:

    nbdinfo --uri NBD-URI
    nbdinfo --isnt read-only|rotational NBD-URI | [ CMD ARGS ... ]
    nbdinfo --cannot cache|connect|... NBD-URI | [ CMD ARGS ... ]

Other options:

    nbdinfo --help
    nbdinfo --version
    --content, --no-content   describe the first sectors of each export
    --color, --no-color       ANSI colours (default: if stdout is a terminal)
    --map=CONTEXT             the map of another meta context (repeatable)
    --offset=N, --length=N    --map only N bytes from offset N

Examples:

    nbdinfo nbd://localhost
    nbdinfo \"nbd+unix:///?socket=/tmp/unixsock\"
    nbdinfo --size nbd://example.com
    nbdinfo --can connect nbd://example.com
    nbdinfo --is read-only nbd://example.com
    nbdinfo --map nbd://example.com
    nbdinfo --json nbd://example.com
    nbdinfo --list nbd://example.com
    nbdinfo --map -- [ qemu-nbd -r -f qcow2 file.qcow2 ]

Please read the nbdinfo(1) manual page for full usage.

";

const TOOL: Tool = Tool {
    name: "nbdinfo",
    usage: USAGE,
    version: || cli::libnbd_version("nbdinfo"),
    long_options: &[
        "--help",
        "--can",
        "--cannot",
        "--color",
        "--colors",
        "--colour",
        "--colours",
        "--no-color",
        "--no-colors",
        "--no-colour",
        "--no-colours",
        "--content",
        "--no-content",
        "--has",
        "--hasnt",
        "--is",
        "--isnt",
        "--json",
        "--length",
        "--list",
        "--map",
        "--offset",
        "--size",
        "--total",
        "--totals",
        "--uri",
        "--version",
    ],
    short_options: &["-L", "-V"],
};

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// The full report on the export.
    Show,
    /// The report on every export.
    List,
    /// The size.
    Size,
    /// A flag test (true: negated, `--cannot`/`--isnt`/`--hasnt`).
    Can(Flag, bool),
    /// The URI of the export.
    Uri,
    /// The maps of one or more meta contexts, over a range.
    Map {
        contexts: Vec<String>,
        totals: bool,
        offset: u64,
        length: Option<u64>,
    },
}

/// The flags `--can` and `--is` test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flag {
    Connect,
    Tls,
    Structured,
    ReadOnly,
    Write,
    Rotational,
    Cache,
    Df,
    FastZero,
    Flush,
    Fua,
    MultiConn,
    Trim,
    Zero,
    Extended,
}

impl Flag {
    fn parse(s: &str) -> Option<Flag> {
        let s = s.to_ascii_lowercase();
        Some(match s.as_str() {
            "connect" | "read" => Flag::Connect,
            "tls" => Flag::Tls,
            "sr" | "structured" | "structured-reply" | "structured-replies"
            | "structured_reply" | "structured_replies" | "structured-read" | "structured_read" => {
                Flag::Structured
            }
            "readonly" | "read-only" | "read_only" => Flag::ReadOnly,
            "write" => Flag::Write,
            "rotational" => Flag::Rotational,
            "cache" => Flag::Cache,
            "df" => Flag::Df,
            "fastzero" | "fast-zero" | "fast_zero" => Flag::FastZero,
            "flush" => Flag::Flush,
            "fua" => Flag::Fua,
            "multiconn" | "multi-conn" | "multi_conn" => Flag::MultiConn,
            "trim" => Flag::Trim,
            "zero" => Flag::Zero,
            "extended-headers" | "extended_headers" | "extended headers" | "extended-header"
            | "extended_header" | "extended header" | "extended" | "eh" => Flag::Extended,
            _ => return None,
        })
    }

    fn test(self, c: &Connection) -> bool {
        match self {
            Flag::Connect => true,
            Flag::Tls => c.tls(),
            Flag::Structured => c.structured_replies(),
            Flag::ReadOnly => c.is_read_only(),
            Flag::Write => !c.is_read_only(),
            Flag::Rotational => c.is_rotational(),
            Flag::Cache => c.can_cache(),
            Flag::Df => c.can_df(),
            Flag::FastZero => c.can_fast_zero(),
            Flag::Flush => c.can_flush(),
            Flag::Fua => c.can_fua(),
            Flag::MultiConn => c.can_multi_conn(),
            Flag::Trim => c.can_trim(),
            Flag::Zero => c.can_zero(),
            Flag::Extended => c.extended_headers(),
        }
    }
}

/// The parsed command line.
#[derive(Debug)]
struct Cli {
    mode: Mode,
    style: Style,
    content: bool,
    target: Target,
}

fn command() -> Command {
    let flag = |name: &'static str| Arg::new(name).long(name).action(ArgAction::SetTrue);
    Command::new("nbdinfo")
        .disable_help_flag(true)
        .disable_version_flag(true)
        .infer_long_args(true)
        .args_override_self(true)
        .arg(flag("help"))
        .arg(flag("version").short('V'))
        .arg(
            Arg::new("can")
                .long("can")
                .value_name("FLAG")
                .action(ArgAction::Set),
        )
        .arg(
            Arg::new("is")
                .long("is")
                .value_name("FLAG")
                .action(ArgAction::Set),
        )
        .arg(
            Arg::new("has")
                .long("has")
                .value_name("FLAG")
                .action(ArgAction::Set),
        )
        .arg(
            Arg::new("cannot")
                .long("cannot")
                .value_name("FLAG")
                .action(ArgAction::Set),
        )
        .arg(
            Arg::new("isnt")
                .long("isnt")
                .value_name("FLAG")
                .action(ArgAction::Set),
        )
        .arg(
            Arg::new("hasnt")
                .long("hasnt")
                .value_name("FLAG")
                .action(ArgAction::Set),
        )
        .arg(flag("uri"))
        .arg(flag("color").aliases(["colors", "colour", "colours"]))
        .arg(flag("no-color").aliases(["no-colors", "no-colour", "no-colours"]))
        .arg(flag("content"))
        .arg(flag("no-content"))
        .arg(flag("json"))
        .arg(flag("list").short('L'))
        .arg(
            Arg::new("map")
                .long("map")
                .value_name("CONTEXT")
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("")
                .action(ArgAction::Append),
        )
        .arg(
            Arg::new("offset")
                .long("offset")
                .value_name("N")
                .action(ArgAction::Set),
        )
        .arg(
            Arg::new("length")
                .long("length")
                .value_name("N")
                .action(ArgAction::Set),
        )
        .arg(flag("size"))
        .arg(flag("totals").alias("total"))
        .arg(flag("no-totals"))
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
    // An unmatched `[` or an empty `[ ]`: the usage, as libnbd's.
    let line = CommandLine::split(args).map_err(|_| Action::Usage(String::new()))?;
    let m = cli::matches(command(), &line.args)?;
    if m.get_flag("help") {
        return Err(Action::Help);
    }
    if m.get_flag("version") {
        return Err(Action::Version);
    }

    // --can, --is, --has and their negations are one option; the last
    // one counts.
    let can = ["can", "is", "has", "cannot", "isnt", "hasnt"]
        .iter()
        .filter_map(|&id| last_index(&m, id).map(|i| (i, id)))
        .max()
        .map(|(_, id)| {
            let negated = matches!(id, "cannot" | "isnt" | "hasnt");
            (
                m.get_one::<String>(id).cloned().unwrap_or_default(),
                negated,
            )
        });
    let list = m.get_flag("list");
    let size = m.get_flag("size");
    let uri = m.get_flag("uri");
    let map: Option<Vec<String>> = m.get_many::<String>("map").map(|v| v.cloned().collect());
    let totals = toggle(&m, "totals", "no-totals").unwrap_or(false);
    let modes = [list, size, map.is_some(), can.is_some(), uri];
    if modes.iter().filter(|&&x| x).count() > 1 {
        return Err(anyhow!("you cannot use --list, --map and --size together.").into());
    }
    if totals && map.is_none() {
        return Err(anyhow!("you must use --totals only with --map option.").into());
    }
    let size_opt = |id: &str| -> Result<Option<u64>, Action<Cli>> {
        match m.get_one::<String>(id) {
            None => Ok(None),
            Some(s) => libnbd::parse_size(s)
                .map(Some)
                .map_err(|_| anyhow!("could not parse --{id} option: {s}").into()),
        }
    };
    let range_offset = size_opt("offset")?;
    let range_length = size_opt("length")?;
    if (range_offset.is_some() || range_length.is_some()) && map.is_none() {
        return Err(anyhow!("you must use --offset and --length only with --map option.").into());
    }
    let mode = if list {
        Mode::List
    } else if size {
        Mode::Size
    } else if uri {
        Mode::Uri
    } else if let Some((c, negated)) = can {
        let flag = Flag::parse(&c).ok_or_else(|| anyhow!("unknown --can or --is option: {c}"))?;
        Mode::Can(flag, negated)
    } else if let Some(list) = map {
        let mut contexts: Vec<String> = Vec::new();
        for ctx in list {
            let c = if ctx.is_empty() {
                "base:allocation".to_string()
            } else {
                ctx
            };
            if !contexts.contains(&c) {
                contexts.push(c);
            }
        }
        Mode::Map {
            contexts,
            totals,
            offset: range_offset.unwrap_or(0),
            length: range_length,
        }
    } else {
        Mode::Show
    };

    let positional: Vec<OsString> = m
        .get_many::<OsString>("args")
        .map(|v| v.cloned().collect())
        .unwrap_or_default();
    let target = line.one_target(&positional)?;
    let json = m.get_flag("json");
    let color = toggle(&m, "color", "no-color").unwrap_or_else(|| io::stdout().is_terminal());
    let content = toggle(&m, "content", "no-content").unwrap_or(mode == Mode::Show);
    Ok(Cli {
        mode,
        style: Style { json, color },
        content,
        target,
    })
}

/// Run nbdinfo with these arguments (without the program name);
/// returns the exit status.
pub fn main(args: Vec<OsString>) -> i32 {
    let cli = match cli::finish(&TOOL, parse(args)) {
        Ok(cli) => cli,
        Err(status) => return status,
    };
    let rt = match cli::runtime("nbdinfo", None) {
        Ok(rt) => rt,
        Err(e) => {
            cli::fail("nbdinfo", &e);
            return 1;
        }
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let r = rt.block_on(async {
        captive::kill_on_signals().context("signal handlers")?;
        run(&cli, &mut out).await
    });
    let flushed = out.flush();
    drop(out);
    // Stop captive servers before the runtime goes.
    drop(rt);
    match r {
        Ok(status) => {
            if let Err(e) = flushed {
                if e.kind() != io::ErrorKind::BrokenPipe {
                    libnbd::elog!("nbdinfo: write: {e}");
                    return 1;
                }
            }
            status
        }
        Err(e) => {
            if e.downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
            {
                return 1;
            }
            cli::fail("nbdinfo", &e);
            1
        }
    }
}

/// Options for opening the export directly (not the report modes).
fn direct_options(contexts: Vec<String>) -> ConnectOptions {
    ConnectOptions::new()
        .meta_contexts(contexts)
        .full_info(false)
}

async fn run(cli: &Cli, w: &mut dyn Write) -> Result<i32> {
    match &cli.mode {
        Mode::Show => show_one(cli, w).await,
        Mode::List => list(cli, w).await,
        Mode::Size => {
            let c = cli.target.connect(&direct_options(Vec::new())).await?;
            writeln!(w, "{}", c.size())?;
            let _ = c.disconnect().await;
            Ok(0)
        }
        Mode::Can(flag, negated) => {
            let c = cli.target.connect(&direct_options(Vec::new())).await?;
            let yes = flag.test(&c) != *negated;
            let _ = c.disconnect().await;
            Ok(if yes { 0 } else { 2 })
        }
        Mode::Uri => {
            let n = cli.target.negotiate(&report_options()).await?;
            let name = n.options().export_name.clone();
            let uri = n.uri_for(&name);
            let _ = n.abort().await;
            match uri {
                Some(u) => writeln!(w, "{u}")?,
                None => bail!("--uri: a server run as a subprocess has no URI"),
            }
            Ok(0)
        }
        Mode::Map {
            contexts,
            totals,
            offset,
            length,
        } => {
            let c = cli
                .target
                .connect(&direct_options(contexts.clone()))
                .await?;
            for context in contexts {
                if !c.can_meta_context(context) {
                    bail!("--map: server does not support metadata context {context:?}");
                }
            }
            let size = c.size();
            if *offset > size {
                bail!("--offset {offset} is beyond the end of the export ({size} bytes)");
            }
            let end = length.map_or(size, |l| offset.saturating_add(l).min(size));
            let mut maps = Vec::with_capacity(contexts.len());
            for context in contexts {
                maps.push((
                    context.as_str(),
                    map::collect_range(&c, context, *offset, end).await?,
                ));
            }
            map::write_maps(w, cli.style.json, *totals, &maps, end - offset)?;
            let _ = c.disconnect().await;
            Ok(0)
        }
    }
}

/// Options for the report modes (option negotiation, no contexts:
/// they are listed, not selected).
fn report_options() -> ConnectOptions {
    ConnectOptions::new().meta_contexts(Vec::<String>::new())
}

fn export_label(name: &str) -> String {
    if name.is_empty() {
        "the default export".into()
    } else {
        format!("export {name:?}")
    }
}

async fn show_one(cli: &Cli, w: &mut dyn Write) -> Result<i32> {
    let mut n = cli.target.negotiate(&report_options()).await?;
    show::write_header(w, cli.style, Header::of(&n))?;
    let name = n.options().export_name.clone();
    let (report, conn): (ExportReport, Option<Connection>) =
        match show::gather(&mut n, &name, None, cli.content).await {
            Ok(r) => r,
            Err(e) => {
                show::write_footer_after_error(w, cli.style)?;
                bail!(
                    "{e} for {} (to list all exports on the server, use --list)",
                    export_label(&name)
                );
            }
        };
    show::write_export(w, cli.style, &report, 0, 1)?;
    show::write_footer(w, cli.style, 1)?;
    match conn {
        Some(c) => {
            let _ = c.disconnect().await;
        }
        None => {
            let _ = n.abort().await;
        }
    }
    Ok(0)
}

async fn list(cli: &Cli, w: &mut dyn Write) -> Result<i32> {
    let mut n = cli.target.negotiate(&report_options()).await?;
    let header = Header::of(&n);
    let exports = n.list_exports().await.context("cannot list the exports")?;
    let mut status = 0;
    let mut reports = Vec::new();
    for e in &exports {
        let desc = e.description.as_deref().unwrap_or("");
        let r = if cli.content {
            // Probing opens the export: use a connection of its own.
            let mut n2 = cli.target.negotiate(&report_options()).await?;
            let r = show::gather(&mut n2, &e.name, Some(desc), true).await;
            match &r {
                Ok((_, Some(c))) => {
                    let _ = c.disconnect().await;
                }
                _ => {
                    let _ = n2.abort().await;
                }
            }
            r.map(|(report, _)| report)
        } else {
            show::gather(&mut n, &e.name, Some(desc), false)
                .await
                .map(|(report, _)| report)
        };
        match r {
            Ok(report) => reports.push(report),
            Err(err) => {
                libnbd::elog!("nbdinfo: {err} for {}", export_label(&e.name));
                status = 1;
            }
        }
    }
    let _ = n.abort().await;
    show::write_header(w, cli.style, header)?;
    for (i, r) in reports.iter().enumerate() {
        show::write_export(w, cli.style, r, i, reports.len())?;
    }
    show::write_footer(w, cli.style, reports.len())?;
    Ok(status)
}
