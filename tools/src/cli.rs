//! The command-line front the four tools (`nbdkit`, `nbdinfo`,
//! `nbdcopy`, `nbddump`) share: taking `[ CMD ARGS ... ]` out of the
//! arguments, the wording of argument errors, how a tool ends (help,
//! version, usage error, error message and exit status), one-line
//! error messages from `anyhow` chains, and the runtime.
//!
//! A tool parses its own options into an [`Action`] and hands it to
//! [`finish`], which prints what is to be printed and gives the exit
//! status, or the parsed work to run.

use std::ffi::{OsStr, OsString};
use std::io::{self, Write};

use anyhow::{anyhow, bail, Result};
use clap::parser::ValueSource;
use clap::ArgMatches;
use libnbd::captive::Target;

/// The libnbd release whose tools these behave like.
pub const LIBNBD_VERSION: &str = "1.14.2";

/// A tool's fixed texts.
pub(crate) struct Tool {
    /// The program name, the prefix of every message.
    pub name: &'static str,
    /// What `--help` prints (and a usage error, on stderr).
    pub usage: &'static str,
    /// What `--version` prints.
    pub version: fn() -> String,
    /// What `--long-options` prints, one a line (bash completion), in
    /// upstream's order.
    pub long_options: &'static [&'static str],
    /// What `--short-options` prints.
    pub short_options: &'static [&'static str],
}

/// The `--version` lines of a libnbd tool: `TOOL 1.14.2`, `libnbd 1.14.2`.
pub(crate) fn libnbd_version(name: &str) -> String {
    format!("{name} {LIBNBD_VERSION}\nlibnbd {LIBNBD_VERSION}\n")
}

/// What a command line asks for.
pub(crate) enum Action<T> {
    /// Do the work.
    Run(Box<T>),
    /// `--help`: the usage on stdout, exit 0.
    Help,
    /// `--version`/`-V`: exit 0.
    Version,
    /// `--long-options`: the long options, one a line, exit 0.
    LongOptions,
    /// `--short-options`: the short options, one a line, exit 0.
    ShortOptions,
    /// Some other text on stdout (`nbdfuse --fuse-help`), exit 0.
    Text(String),
    /// Bad usage: the message (if any), then the usage on stderr, exit 1.
    Usage(String),
    /// A bad value or a failure: the message alone, exit 1.
    Error(anyhow::Error),
}

impl<T> From<anyhow::Error> for Action<T> {
    fn from(e: anyhow::Error) -> Self {
        Action::Error(e)
    }
}

/// Print what `action` asks to print; `Ok` is the work to do, `Err` the
/// exit status when there is nothing more to do.
pub(crate) fn finish<T>(tool: &Tool, action: Action<T>) -> Result<Box<T>, i32> {
    match action {
        Action::Run(work) => Ok(work),
        Action::Help => {
            print!("{}", tool.usage);
            Err(0)
        }
        Action::Version => {
            outln(format_args!("{}", (tool.version)().trim_end_matches('\n')));
            Err(0)
        }
        Action::LongOptions | Action::ShortOptions => {
            let list = match action {
                Action::LongOptions => tool.long_options,
                _ => tool.short_options,
            };
            for o in list {
                outln(format_args!("{o}"));
            }
            Err(0)
        }
        Action::Text(text) => {
            print!("{text}");
            Err(0)
        }
        Action::Usage(msg) => {
            let mut err = io::stderr().lock();
            if !msg.is_empty() {
                let _ = writeln!(err, "{}: {msg}", tool.name);
            }
            let _ = write!(err, "{}", tool.usage);
            Err(1)
        }
        Action::Error(e) => {
            fail(tool.name, &e);
            Err(1)
        }
    }
}

/// Print an error as `PROG: message` on stderr.
pub(crate) fn fail(prog: &str, e: &anyhow::Error) {
    libnbd::elog!("{prog}: {}", error_message(e));
}

/// The message of a command-line error from clap, in one line and in
/// the words of getopt(3), as the C tools say it (`unrecognized option
/// '--foo'`, `invalid option -- 'x'`, `option '--can' requires an
/// argument`, ...). `args` are the words parsed (without the program
/// name), to tell a long option from a short one.
pub(crate) fn clap_message(e: &clap::Error, args: &[OsString]) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => String::new(),
    };
    // "--can <FLAG>" or "-n <N>" or "-n, --length <N>": the option alone.
    let long = arg
        .split([' ', ','])
        .find(|w| w.starts_with("--"))
        .map(str::to_string);
    // A missing value is at the end: the last word says which form.
    let last = args.last().and_then(|a| a.to_str()).unwrap_or("");
    let short = (last.len() >= 2 && last.starts_with('-') && !last.starts_with("--"))
        .then(|| last[last.len() - 1..].to_string());
    match e.kind() {
        ErrorKind::UnknownArgument => {
            if arg.starts_with("--") {
                // getopt names the whole word, `=value` and all.
                let word = args
                    .iter()
                    .filter_map(|a| a.to_str())
                    .find(|a| a.split('=').next() == Some(arg.as_str()))
                    .unwrap_or(&arg);
                format!("unrecognized option '{word}'")
            } else {
                format!("invalid option -- '{}'", arg.trim_start_matches('-'))
            }
        }
        ErrorKind::InvalidValue | ErrorKind::NoEquals
            if e.get(ContextKind::InvalidValue)
                .is_none_or(|v| matches!(v, ContextValue::String(s) if s.is_empty())) =>
        {
            match (&long, &short) {
                (_, Some(s)) => format!("option requires an argument -- '{s}'"),
                (Some(l), None) => format!("option '{l}' requires an argument"),
                _ => first_line(e),
            }
        }
        ErrorKind::TooManyValues if long.is_some() => {
            format!(
                "option '{}' doesn't allow an argument",
                long.unwrap_or_default()
            )
        }
        _ => first_line(e),
    }
}

/// clap's own message, its first line without `error: `.
fn first_line(e: &clap::Error) -> String {
    let msg = e.to_string();
    let first = msg.lines().next().unwrap_or("bad arguments");
    first.trim_start_matches("error: ").to_string()
}

/// An error as one line: its causes joined with `: ` (skipping those
/// already spelled out), without std's "(os error N)" suffixes.
pub(crate) fn error_message(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if line.contains(&s) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&s);
    }
    let mut out = String::with_capacity(line.len());
    let mut rest = line.as_str();
    while let Some(i) = rest.find(" (os error ") {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        match rest.find(')') {
            Some(j) => rest = &rest[j + 1..],
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// Print a line on stdout as `println!` does, except that a closed pipe
/// (`nbdkit --dump-plugin memory | head -1`) ends the program with
/// status 141, as SIGPIPE ends a C program, instead of a panic.
pub(crate) fn outln(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}").and_then(|()| out.flush()) {
        if e.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
    }
}

/// Did this error come from writing to a closed pipe
/// (`nbddump ... | head`)?
pub(crate) fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Start the async runtime (`threads` workers, or one per CPU).
pub(crate) fn runtime(prog: &str, threads: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        b.worker_threads(n);
    }
    b.thread_name(prog)
        .enable_all()
        .build()
        .map_err(|e| anyhow!("cannot start the runtime: {e}"))
}

/// A command line with its `[ CMD ARGS ... ]` groups taken out, so that
/// a server's arguments are never read as the tool's options. Each
/// group leaves a placeholder word in [`args`](Self::args) (a word no
/// real argument can be: it holds a NUL), which [`target`](Self::target)
/// turns back into the command.
pub(crate) struct CommandLine {
    /// The arguments, with a placeholder for each command group.
    pub args: Vec<OsString>,
    /// The command groups, in order.
    commands: Vec<Vec<OsString>>,
}

const PLACEHOLDER: &str = "\0[ CMD ]";

impl CommandLine {
    /// Take every `[ ... ]` group (a `[` word up to the next `]` word)
    /// out of `args`.
    pub fn split(args: Vec<OsString>) -> Result<CommandLine> {
        let mut out = Vec::with_capacity(args.len());
        let mut commands = Vec::new();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            if a != "[" {
                out.push(a);
                continue;
            }
            let mut cmd = Vec::new();
            loop {
                match it.next() {
                    Some(w) if w == "]" => break,
                    Some(w) => cmd.push(w),
                    None => bail!("'[' without a matching ']'"),
                }
            }
            if cmd.is_empty() {
                bail!("empty command in [ ]");
            }
            commands.push(cmd);
            out.push(OsString::from(format!(
                "{PLACEHOLDER}{}",
                commands.len() - 1
            )));
        }
        Ok(CommandLine {
            args: out,
            commands,
        })
    }

    /// The command group a placeholder word stands for.
    pub fn command(&self, word: &OsStr) -> Option<&[OsString]> {
        let i: usize = word.to_str()?.strip_prefix(PLACEHOLDER)?.parse().ok()?;
        self.commands.get(i).map(Vec::as_slice)
    }

    /// The one server that the positional words name (nbdinfo,
    /// nbddump); none or more than one is a usage error (the usage text
    /// alone, as libnbd's tools).
    pub fn one_target<T>(&self, positional: &[OsString]) -> Result<Target, Action<T>> {
        match positional {
            [word] => Ok(self.target(word)?),
            _ => Err(Action::Usage(String::new())),
        }
    }

    /// The server a positional word names: a command group or a URI.
    pub fn target(&self, word: &OsString) -> Result<Target> {
        match self.command(word) {
            Some(cmd) => Ok(Target::Command(cmd.to_vec())),
            None => Ok(Target::from_args(std::slice::from_ref(word))?.0),
        }
    }
}

/// Parse `args` (without the program name) with `cmd`, answering
/// `--long-options` and `--short-options` (every tool has them, for bash
/// completion) and argument errors (getopt's message, then the usage).
pub(crate) fn matches<T>(cmd: clap::Command, args: &[OsString]) -> Result<ArgMatches, Action<T>> {
    use clap::{Arg, ArgAction};
    let hidden = |name: &'static str| {
        Arg::new(name)
            .long(name)
            .action(ArgAction::SetTrue)
            .hide(true)
    };
    let name = OsString::from(cmd.get_name());
    let m = cmd
        .arg(hidden("long-options"))
        .arg(hidden("short-options"))
        .try_get_matches_from(std::iter::once(name).chain(args.iter().cloned()))
        .map_err(|e| Action::Usage(clap_message(&e, args)))?;
    if m.get_flag("long-options") {
        return Err(Action::LongOptions);
    }
    if m.get_flag("short-options") {
        return Err(Action::ShortOptions);
    }
    Ok(m)
}

/// The last position of an option on the command line, if given.
pub(crate) fn last_index(m: &ArgMatches, id: &str) -> Option<usize> {
    if m.value_source(id) != Some(ValueSource::CommandLine) {
        return None;
    }
    m.indices_of(id).and_then(|i| i.max())
}

/// Which of two opposite flags (`--color`/`--no-color`) came last.
pub(crate) fn toggle(m: &ArgMatches, on: &str, off: &str) -> Option<bool> {
    match (last_index(m, on), last_index(m, off)) {
        (None, None) => None,
        (Some(_), None) => Some(true),
        (None, Some(_)) => Some(false),
        (Some(a), Some(b)) => Some(a > b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn command_groups_are_taken_out() {
        let c = CommandLine::split(words(
            "--json [ qemu-nbd -f qcow2 x ] -- [ nbdkit memory 1M ]",
        ))
        .unwrap();
        assert_eq!(c.args.len(), 4);
        assert_eq!(c.args[0], "--json");
        assert_eq!(
            c.command(&c.args[1]).unwrap(),
            &words("qemu-nbd -f qcow2 x")[..]
        );
        assert_eq!(c.args[2], "--");
        assert_eq!(
            c.command(&c.args[3]).unwrap(),
            &words("nbdkit memory 1M")[..]
        );
        assert!(c.command(OsStr::new("nbd://x")).is_none());
        assert!(matches!(c.target(&c.args[3]), Ok(Target::Command(_))));
        assert!(matches!(
            c.target(&OsString::from("nbd://x")),
            Ok(Target::Uri(_))
        ));
        assert!(CommandLine::split(words("[ nbdkit memory 1M")).is_err());
        assert!(CommandLine::split(words("[ ] x")).is_err());
    }

    fn getopt_says(args: &str) -> String {
        use clap::{Arg, ArgAction, Command};
        let cmd = Command::new("t")
            .infer_long_args(true)
            .arg(Arg::new("json").long("json").action(ArgAction::SetTrue))
            .arg(Arg::new("can").long("can").value_name("FLAG"))
            .arg(Arg::new("length").short('n').long("length").value_name("N"))
            .arg(Arg::new("v").short('v').action(ArgAction::SetTrue))
            .arg(Arg::new("args").num_args(0..));
        let w = words(args);
        let e = cmd
            .try_get_matches_from(std::iter::once(OsString::from("t")).chain(w.clone()))
            .err()
            .unwrap_or_else(|| panic!("{args}: no error"));
        clap_message(&e, &w)
    }

    #[test]
    fn clap_errors_in_getopts_words() {
        assert_eq!(getopt_says("--foo x"), "unrecognized option '--foo'");
        assert_eq!(getopt_says("--foo=3 x"), "unrecognized option '--foo=3'");
        assert_eq!(getopt_says("-x"), "invalid option -- 'x'");
        assert_eq!(getopt_says("-vx"), "invalid option -- 'x'");
        assert_eq!(getopt_says("--can"), "option '--can' requires an argument");
        assert_eq!(
            getopt_says("--length"),
            "option '--length' requires an argument"
        );
        assert_eq!(getopt_says("-n"), "option requires an argument -- 'n'");
        assert_eq!(
            getopt_says("--json=1 x"),
            "option '--json' doesn't allow an argument"
        );
    }

    #[test]
    fn error_messages_are_one_line() {
        let e =
            anyhow::Error::from(io::Error::from_raw_os_error(libc::ENOENT)).context("/nonexistent");
        assert_eq!(error_message(&e), "/nonexistent: No such file or directory");
    }
}
