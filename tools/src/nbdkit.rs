//! `nbdkit`: serve a plugin, stacked under filters, over NBD.
//!
//! Command-line compatible with nbdkit 1.32:
//!
//! ```text
//! nbdkit [options] PLUGIN [[KEY=]VALUE ...]
//! nbdkit -U - memory 1G --run 'nbdinfo $uri'
//! nbdkit --filter=cow file disk.img
//! ```
//!
//! Listening: `-U SOCKET` (or `-U -` for a private socket in a temporary
//! directory), `-p PORT` and `-i ADDR` for TCP, `-s` for one client on
//! stdin/stdout, or sockets inherited by systemd socket activation
//! (`LISTEN_PID`/`LISTEN_FDS`). Without `-f` the server detaches into the
//! background once it is listening; `--run CMD` keeps it captive and
//! exits with the command's status.

use std::ffi::OsString;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use libnbd::config::{FilterEntry, Params, PluginEntry};
use libnbd::listen::{self, Listener};
use libnbd::server::{self, ServerConfig, ServerContext};
use libnbd::tls::ServerTls;
use libnbd::{Stack, ThreadModel};

use crate::cli::{self, Action, Tool};

/// The nbdkit version we are compatible with, printed by `--version`.
pub const COMPAT_VERSION: &str = "1.32.5";

const USAGE: &str = "\
nbdkit [-4|--ipv4-only] [-6|--ipv6-only]
       [-D|--debug PLUGIN|FILTER|nbdkit.FLAG=N]
       [--exit-with-parent] [-e|--exportname EXPORTNAME]
       [--filter=FILTER ...] [-f|--foreground]
       [-i|--ipaddr IPADDR] [--keepalive]
       [--log=stderr|syslog|null]
       [-n|--newstyle] [--no-mc] [--no-sr]
       [-P|--pidfile PIDFILE] [-p|--port PORT]
       [-r|--readonly] [--run 'COMMAND ARGS ...']
       [-s|--single] [-t|--threads THREADS] [--timeout=TIMEOUT]
       [--tls=off|on|require]
       [--tls-certificates=/path/to/certificates]
       [--tls-psk=/path/to/pskfile] [--tls-verify-peer]
       [-U|--unix SOCKET|-] [-v|--verbose]
       PLUGIN [[KEY=]VALUE [KEY=VALUE [...]]]

nbdkit --dump-config

nbdkit PLUGIN --dump-plugin

nbdkit --help

nbdkit [-V|--version]

Please read the nbdkit(1) manual page for full usage.
";

const TOOL: Tool = Tool {
    name: "nbdkit",
    usage: USAGE,
    version: || format!("nbdkit {COMPAT_VERSION}\n"),
    // Upstream's list and order, less what this nbdkit does not have
    // (-g/--group, --mask-handshake, -o/--oldstyle, --selinux-label,
    // --swap, --tls-certificates, --tls-psk, --tls-verify-peer,
    // -u/--user, --vsock), plus --no-mc and --no-eh.
    long_options: &[
        "--ipv4-only",
        "--ipv6-only",
        "--debug",
        "--dump-config",
        "--dump-plugin",
        "--exit-with-parent",
        "--export",
        "--export-name",
        "--exportname",
        "--filter",
        "--foreground",
        "--no-fork",
        "--help",
        "--ip-addr",
        "--ipaddr",
        "--keepalive",
        "--log",
        "--new-style",
        "--newstyle",
        "--no-eh",
        "--no-mc",
        "--no-sr",
        "--pid-file",
        "--pidfile",
        "--port",
        "--read-only",
        "--readonly",
        "--run",
        "--single",
        "--stdin",
        "--threads",
        "--timeout",
        "--tls",
        "--unix",
        "--verbose",
        "--version",
    ],
    short_options: &[
        "-4", "-6", "-D", "-e", "-f", "-i", "-n", "-p", "-P", "-r", "-s", "-t", "-U", "-v", "-V",
    ],
};

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "nbdkit",
    infer_long_args = true,
    disable_help_flag = true,
    disable_version_flag = true
)]
struct Cli {
    /// Listen on IPv4 addresses only.
    #[arg(short = '4', long = "ipv4-only")]
    ipv4_only: bool,
    /// Listen on IPv6 addresses only.
    #[arg(short = '6', long = "ipv6-only")]
    ipv6_only: bool,
    /// Debug flags (`PLUGIN.FLAG=N`); this server has none to set.
    #[arg(short = 'D', long = "debug", action = ArgAction::Append)]
    debug: Vec<String>,
    /// Print the build configuration and exit.
    #[arg(long = "dump-config")]
    dump_config: bool,
    /// Print the plugin's details and exit.
    #[arg(long = "dump-plugin")]
    dump_plugin: bool,
    /// Exit when the parent process exits (implies `-f`).
    #[arg(long = "exit-with-parent")]
    exit_with_parent: bool,
    /// The export name used in `$uri` and `$exportname`.
    #[arg(short = 'e', long = "exportname", aliases = ["export", "export-name"])]
    exportname: Option<String>,
    /// Filters, outermost (nearest the client) first.
    #[arg(long = "filter", action = ArgAction::Append)]
    filters: Vec<String>,
    /// Do not fork into the background.
    #[arg(short = 'f', long = "foreground", alias = "no-fork")]
    foreground: bool,
    /// Print usage (and the plugin's parameters when a plugin is named).
    #[arg(long = "help")]
    help: bool,
    /// Address to listen on.
    #[arg(short = 'i', long = "ipaddr", alias = "ip-addr")]
    ipaddr: Option<String>,
    /// Where messages go: stderr, syslog (we write to stderr), or null.
    #[arg(long = "log")]
    log: Option<String>,
    /// Use the fixed newstyle protocol (the default and only one).
    #[arg(short = 'n', long = "newstyle", alias = "new-style")]
    newstyle: bool,
    /// Do not offer extended headers (64-bit requests and replies).
    #[arg(long = "no-eh", alias = "no-extended-headers")]
    no_eh: bool,
    /// Do not offer meta contexts.
    #[arg(long = "no-mc", alias = "no-meta-contexts")]
    no_mc: bool,
    /// Do not offer structured replies.
    #[arg(long = "no-sr", alias = "no-structured-replies")]
    no_sr: bool,
    /// Write the server's pid to this file once it is listening.
    #[arg(short = 'P', long = "pidfile", alias = "pid-file")]
    pidfile: Option<PathBuf>,
    /// TCP port to listen on (default 10809).
    #[arg(short = 'p', long = "port")]
    port: Option<String>,
    /// Serve every export read-only.
    #[arg(short = 'r', long = "readonly", alias = "read-only")]
    readonly: bool,
    /// Run a command against the server, then exit with its status.
    #[arg(long = "run")]
    run: Option<String>,
    /// Serve one client on stdin/stdout.
    #[arg(short = 's', long = "single", alias = "stdin")]
    single: bool,
    /// Requests handled at once per connection.
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
    /// Drop a client that has not finished the handshake within SECS.
    #[arg(long = "timeout", value_name = "SECS")]
    timeout: Option<u64>,
    /// Turn on TCP keepalives on accepted connections.
    #[arg(long = "keepalive")]
    keepalive: bool,
    /// TLS: `off`, `on` (clients may start TLS) or `require`.
    #[arg(long = "tls")]
    tls: Option<String>,
    /// Directory of `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    #[arg(long = "tls-certificates")]
    tls_certificates: Option<PathBuf>,
    /// TLS with pre-shared keys from this psktool file instead of X.509.
    #[arg(long = "tls-psk")]
    tls_psk: Option<PathBuf>,
    /// Require clients to present a certificate the CA signed.
    #[arg(long = "tls-verify-peer")]
    tls_verify_peer: bool,
    /// Listen on a Unix domain socket (`-` for a private one).
    #[arg(short = 'U', long = "unix", allow_hyphen_values = true)]
    unix: Option<PathBuf>,
    /// Print debug messages.
    #[arg(short = 'v', long = "verbose")]
    verbose: bool,
    /// Print the version and exit.
    #[arg(short = 'V', long = "version")]
    version: bool,
    /// PLUGIN followed by its `[KEY=]VALUE` parameters.
    #[arg(allow_hyphen_values = false)]
    words: Vec<OsString>,
}

/// Where the server listens, decided before forking.
enum Listen {
    /// Sockets bound by us or inherited, plus what `$uri` should say.
    Sockets {
        fds: Vec<OwnedFd>,
        uri: Option<UriInfo>,
        /// A private socket directory to remove at exit (`-U -`).
        tmpdir: Option<tempfile::TempDir>,
        /// A socket path to unlink at exit (`-U PATH`).
        unlink: Option<PathBuf>,
    },
    /// One client on stdin/stdout.
    Single,
}

/// What `--run` exports to the command.
struct UriInfo {
    port: Option<u16>,
    unixsocket: Option<PathBuf>,
}

/// Run nbdkit with these arguments (without argv\[0\]); returns the exit
/// status.
pub fn main(args: Vec<OsString>) -> i32 {
    keep_large_buffers();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            libnbd::elog!("nbdkit: error: {}", cli::error_message(&e));
            1
        }
    }
}

/// Let glibc's malloc keep freed buffers of up to 32 MiB for reuse rather
/// than unmapping them: a server allocates buffers of megabytes at a high
/// rate (read replies, blocks decoded by the xz filter, the decoder's
/// dictionary inside liblzma), and with glibc's defaults each of them is
/// mapped, faulted in page by page and unmapped again (a quarter of the CPU
/// of an xz copy went there). Memory use stays bounded by what the layers
/// hold at once; it is only not handed back to the kernel in between.
fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tunables; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

/// `--version`: nbdkit's line, then with a plugin named, a line for each
/// filter (outermost first) and the plugin, as upstream; an unknown
/// plugin or filter fails (nbdkit-probing(1): scripts probe that way).
fn version(cli: &Cli) -> Result<i32> {
    let plugin = match cli.words.first() {
        Some(name) => Some(plugin_by_name(&name.to_string_lossy())?),
        None => None,
    };
    let filters = cli
        .filters
        .iter()
        .map(|f| filter_by_name(f))
        .collect::<Result<Vec<_>, _>>()?;
    print!("{}", (TOOL.version)());
    if let Some(p) = plugin {
        for f in &filters {
            crate::cli::outln(format_args!("{} {COMPAT_VERSION}", f.name));
        }
        crate::cli::outln(format_args!("{} {COMPAT_VERSION}", p.name));
    }
    Ok(0)
}

/// Where upstream points a user who gave no or a wrong plugin.
const SEE_HELP: &str = "Use 'nbdkit --help' or read the nbdkit(1) manual page for documentation.";

fn plugin_by_name(name: &str) -> Result<PluginEntry> {
    let name = name.strip_prefix("nbdkit-").unwrap_or(name);
    let name = name.strip_suffix("-plugin").unwrap_or(name);
    nbdkit_plugins::registry()
        .into_iter()
        .find(|p| p.name.eq_ignore_ascii_case(name)) // `s3` is `S3`
        .ok_or_else(|| {
            anyhow!(
                "cannot open plugin '{name}': no such plugin (plugins: {})\n{SEE_HELP}",
                nbdkit_plugins::registry()
                    .iter()
                    .map(|p| p.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn filter_by_name(name: &str) -> Result<FilterEntry> {
    let name = name.strip_prefix("nbdkit-").unwrap_or(name);
    let name = name.strip_suffix("-filter").unwrap_or(name);
    nbdkit_filters::registry()
        .into_iter()
        .find(|f| f.name == name)
        .ok_or_else(|| {
            anyhow!(
                "cannot open filter '{name}': no such filter (filters: {})",
                nbdkit_filters::registry()
                    .iter()
                    .map(|f| f.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// `--dump-config`: upstream's keys, in its order, with our values.
/// Plugins and filters are built into the binary, so the plugin and
/// filter directories are the binary's own.
fn dump_config() {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("nbdkit"));
    let dir = exe
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let mut parts = COMPAT_VERSION.split('.');
    let major = parts.next().unwrap_or("1");
    let minor = parts.next().unwrap_or("32");
    let cpu = std::env::consts::ARCH;
    let lines = [
        ("binary", exe.display().to_string()),
        ("bindir", dir.clone()),
        ("exit_with_parent", "yes".into()),
        ("filterdir", dir.clone()),
        ("host_cpu", cpu.into()),
        ("host_os", "linux-gnu".into()),
        ("libdir", dir.clone()),
        ("mandir", "/usr/share/man".into()),
        ("name", "nbdkit".into()),
        ("plugindir", dir.clone()),
        ("root_tls_certificates_dir", "/etc/pki/nbdkit".into()),
        ("sbindir", dir),
        ("selinux", "no".into()),
        ("sysconfdir", "/etc".into()),
        ("tls", "yes".into()),
        ("version", COMPAT_VERSION.into()),
        ("version_major", major.into()),
        ("version_minor", minor.into()),
        ("zstd", "yes".into()),
    ];
    for (k, v) in lines {
        crate::cli::outln(format_args!("{k}={v}"));
    }
}

fn run(args: Vec<OsString>) -> Result<i32> {
    let parsed = cli::matches::<()>(Cli::command(), &args).and_then(|m| {
        Cli::from_arg_matches(&m).map_err(|e| Action::Usage(cli::clap_message(&e, &args)))
    });
    let cli = match parsed {
        Ok(c) => c,
        Err(action) => return Ok(cli::finish(&TOOL, action).err().unwrap_or(1)),
    };
    if cli.version {
        return version(&cli);
    }
    if cli.dump_config {
        dump_config();
        return Ok(0);
    }
    let words: Vec<String> = cli
        .words
        .iter()
        .map(|w| {
            w.to_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("parameter {w:?} is not valid UTF-8"))
        })
        .collect::<Result<_, _>>()?;
    let Some((plugin_name, params)) = words.split_first() else {
        if cli.help {
            print!("{USAGE}");
            return Ok(0);
        }
        libnbd::elog!("nbdkit: no plugins given on the command line.");
        libnbd::elog!("{SEE_HELP}");
        return Ok(1);
    };
    let plugin = plugin_by_name(plugin_name)?;
    let filters = cli
        .filters
        .iter()
        .map(|f| filter_by_name(f))
        .collect::<Result<Vec<_>, _>>()?;
    if cli.help {
        print!("{USAGE}");
        for f in &filters {
            crate::cli::outln(format_args!("\nfilter: {}\n{}", f.name, f.help.trim_end()));
        }
        crate::cli::outln(format_args!(
            "\nplugin: {}\n{}",
            plugin.name,
            plugin.help.trim_end()
        ));
        return Ok(0);
    }
    let (tls, tls_mode) = tls_setup(&cli)?;
    if let Some(l) = cli.log.as_deref() {
        if !matches!(l, "stderr" | "syslog" | "null") {
            bail!("--log must be stderr, syslog or null, not '{l}'");
        }
    }
    debug_flags(&cli.debug, plugin.name, &filters)?;
    server::set_verbose(cli.verbose);

    // Configure: filters take their keys first (outermost first), then the
    // plugin takes the rest and rejects what it does not know.
    let mut params = Params::parse(params, plugin.magic)?;
    if cli.dump_plugin {
        // Like upstream, this works without the plugin's required
        // parameters; the plugin's own lines need a configured plugin.
        crate::cli::outln(format_args!("name={}", plugin.name));
        crate::cli::outln(format_args!("version={COMPAT_VERSION}"));
        crate::cli::outln(format_args!("api_version=2"));
        let built = (plugin.create)(&mut params).ok();
        let model = built
            .as_ref()
            .map_or(ThreadModel::Parallel, |p| p.thread_model());
        crate::cli::outln(format_args!("max_thread_model=parallel"));
        crate::cli::outln(format_args!("thread_model={}", model.name()));
        if let Some(m) = plugin.magic {
            crate::cli::outln(format_args!("magic_config_key={m}"));
        }
        for (k, v) in built
            .as_ref()
            .map(|p| p.dump())
            .unwrap_or_else(|| nbdkit_plugins::dump_unconfigured(plugin.name))
        {
            if k.is_empty() {
                crate::cli::outln(format_args!("{v}"));
            } else {
                crate::cli::outln(format_args!("{k}={v}"));
            }
        }
        return Ok(0);
    }
    let stack = build_stack(&plugin, &filters, params)?;
    if cli.verbose {
        let mut names: Vec<&'static str> = filters.iter().map(|f| f.name).collect();
        names.push(plugin.name);
        libnbd::trace::set_layer_names(names);
    }
    let mut cfg = ServerConfig::new(stack);
    cfg.server = ServerContext::new(cli.verbose);
    cfg.tls = tls;
    cfg.tls_required = tls_mode == TlsMode::Require;
    cfg.server.set_readonly(cli.readonly);
    cfg.structured_replies = !cli.no_sr;
    cfg.extended_headers = !cli.no_eh;
    cfg.handshake_timeout = cli
        .timeout
        .filter(|&t| t > 0)
        .map(std::time::Duration::from_secs);
    cfg.keepalive = cli.keepalive;
    cfg.meta_contexts = !cli.no_mc;
    if let Some(t) = cli.threads {
        cfg.threads = if t == 0 { 16 } else { t };
    }

    let listen = bind(&cli)?;
    // Socket activation and -s imply the foreground (the caller owns us).
    let foreground = cli.foreground
        || cli.exit_with_parent
        || cli.run.is_some()
        || matches!(listen, Listen::Single | Listen::Sockets { uri: None, .. });
    if cli.exit_with_parent {
        set_exit_with_parent()?;
    } else if matches!(listen, Listen::Sockets { uri: None, .. }) {
        // Socket activation: the parent (libnbd, a captive client) owns
        // us, so we go when it goes, as nbdkit does; a client that exits
        // on an error without stopping us must not leave us behind.
        let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    }
    if !foreground {
        daemonize(cli.pidfile.as_deref())?;
    } else if let Some(p) = &cli.pidfile {
        write_pidfile(p)?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cfg = Arc::new(cfg);
    {
        let _guard = rt.enter();
        cfg.stack
            .after_fork(&cfg.server)
            .map_err(|e| anyhow!(e.msg))?;
    }
    let code = rt.block_on(serve(cfg.clone(), listen, &cli, tls_mode));
    cfg.stack.unload();
    // Don't wait for blocking tasks (e.g. a stdin reader) to finish.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

/// Configure the filters (outermost first, each taking its keys) and
/// then the plugin, which takes the rest and refuses what it does not
/// know; the plugin is then told the configuration is complete.
fn build_stack(plugin: &PluginEntry, filters: &[FilterEntry], mut params: Params) -> Result<Stack> {
    let mut built_filters = Vec::new();
    for f in filters {
        built_filters.push((f.create)(&mut params)?);
    }
    let built_plugin = plugin.configure(&mut params)?;
    built_plugin.get_ready()?;
    Ok(Stack {
        filters: built_filters,
        plugin: built_plugin,
    })
}

/// A captive `[ nbdkit ... ]` that a tool runs inside its own process,
/// calling the stack directly instead of through a socket (see
/// [`in_process`]).
pub struct InProcess {
    /// The configured plugin and filters.
    pub stack: Stack,
    /// The server's state: `-r`, and what layers ask of the server.
    pub server: Arc<ServerContext>,
    /// Block status is offered (not `--no-sr` or `--no-mc`: a client of
    /// the spawned server would get no `base:allocation` then).
    pub block_status: bool,
}

/// The options (by [`Cli`] field) that mean nothing but the stack
/// itself, so that a captive server with no others may run in-process.
const STACK_OPTIONS: &[&str] = &[
    "filters",
    "readonly",
    "foreground",
    "newstyle",
    "exportname",
    "threads",
    "no_eh",
    "no_mc",
    "no_sr",
    "words",
];

/// Set to any value, a captive `nbdkit` is always run as a process.
pub const SPAWN_ENV: &str = "NBDCOPY_SPAWN_CAPTIVE";

/// `argv` of a captive server (`[ nbdkit ... ]`, without the brackets)
/// configured in this process, if it can be: the command must be this
/// build's nbdkit (the `nbdkit` next to the running binary, named by
/// path or found first on `$PATH`), and its options only those that
/// mean nothing but the stack itself: `--filter`, `-r`, `-f`, `-n`,
/// `-e`, `-t`, `--no-sr`/`--no-eh`/`--no-mc`. Anything else (`-v`,
/// TLS, listening options, `--run`, an unknown plugin, a parse error)
/// gives `None`, and the caller spawns the command as usual, which then
/// says what it says; so does `$NBDCOPY_SPAWN_CAPTIVE`. A configuration
/// error (a bad parameter) is `Some(Err)`, in nbdkit's words.
pub fn in_process(argv: &[OsString]) -> Option<Result<InProcess>> {
    let (cmd, args) = argv.split_first()?;
    if std::env::var_os(SPAWN_ENV).is_some() || !is_this_nbdkit(cmd) {
        return None;
    }
    let c = stack_only_cli(args)?;
    let words: Vec<String> = c
        .words
        .iter()
        .map(|w| w.to_str().map(str::to_string))
        .collect::<Option<_>>()?;
    let (plugin_name, params) = words.split_first()?;
    let plugin = plugin_by_name(plugin_name).ok()?;
    let filters = c
        .filters
        .iter()
        .map(|f| filter_by_name(f))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some((|| {
        let params = Params::parse(params, plugin.magic)?;
        let stack = build_stack(&plugin, &filters, params)?;
        let server = ServerContext::new(false);
        server.set_readonly(c.readonly);
        Ok(InProcess {
            stack,
            server,
            block_status: !c.no_sr && !c.no_mc,
        })
    })())
}

/// The command line, if it parses and gives no option but
/// [`STACK_OPTIONS`] (any other, a new one too, means a real server).
fn stack_only_cli(args: &[OsString]) -> Option<Cli> {
    let m = cli::matches::<()>(Cli::command(), args).ok()?;
    let beyond = Cli::command().get_arguments().any(|a| {
        let id = a.get_id().as_str();
        m.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
            && !STACK_OPTIONS.contains(&id)
    });
    if beyond {
        return None;
    }
    Cli::from_arg_matches(&m).ok()
}

/// Is `cmd` (a path, or a name looked up on `$PATH` as `execvp` does)
/// the `nbdkit` installed next to the running program?
fn is_this_nbdkit(cmd: &std::ffi::OsStr) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(ours) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("nbdkit")))
        .and_then(|p| std::fs::canonicalize(p).ok())
    else {
        return false;
    };
    let path = std::path::Path::new(cmd);
    let found = if cmd.as_encoded_bytes().contains(&b'/') {
        Some(path.to_path_buf())
    } else {
        std::env::var_os("PATH").and_then(|dirs| {
            std::env::split_paths(&dirs)
                .map(|d| d.join(path))
                .find(|p| {
                    std::fs::metadata(p)
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                })
        })
    };
    found
        .and_then(|p| std::fs::canonicalize(p).ok())
        .is_some_and(|p| p == ours)
}

/// `-D NAME.FLAG=N`: the server's own flags (`nbdkit.backend.controlpath`
/// and `nbdkit.backend.datapath` silence those halves of `-v`'s per-call
/// lines); our plugins and filters have no debug flags, so for one of
/// theirs the warning is upstream's for a flag the layer lacks, and a
/// name that is no layer of the stack is warned about as unused.
fn debug_flags(flags: &[String], plugin: &str, filters: &[FilterEntry]) -> Result<()> {
    for d in flags {
        let parsed = d.split_once('=').and_then(|(name, n)| {
            let (layer, flag) = name.split_once('.')?;
            let n: i64 = n.trim().parse().ok()?;
            (!layer.is_empty() && !flag.is_empty()).then_some((layer, flag, n))
        });
        let Some((layer, flag, n)) = parsed else {
            bail!("-D (Debug Flag) must have the format NAME.FLAG=N");
        };
        let symbol = |l: &str| format!("{}_debug_{}", l.replace('-', "_"), flag.replace('.', "_"));
        match (layer, flag) {
            ("nbdkit", "backend.controlpath") => libnbd::trace::set_control_path(n != 0),
            ("nbdkit", "backend.datapath") => libnbd::trace::set_data_path(n != 0),
            _ if layer == "nbdkit"
                || layer == plugin
                || filters.iter().any(|f| f.name == layer) =>
            {
                libnbd::elog!(
                    "nbdkit: warning: -D {layer}.{flag}: {layer} does not contain a global \
                     variable called {}",
                    symbol(layer)
                );
            }
            _ => libnbd::elog!("nbdkit: warning: debug flag -D {layer}.{flag} was not used"),
        }
    }
    Ok(())
}

/// `--tls`: whether clients may, or must, use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsMode {
    Off,
    On,
    Require,
}

/// The TLS mode and credentials from `--tls`, `--tls-certificates`,
/// `--tls-psk` and `--tls-verify-peer`, as nbdkit decides them: PSK when
/// a PSK file is given, else certificates from the directory given or
/// the first default one that has them; without `--tls`, TLS is on when
/// credentials load and off when none are found.
fn tls_setup(cli: &Cli) -> Result<(Option<Arc<ServerTls>>, TlsMode)> {
    let asked = match cli.tls.as_deref() {
        None => None,
        Some("require" | "required" | "force") => Some(TlsMode::Require),
        Some(t) => match libnbd::parse_bool(t) {
            Ok(true) => Some(TlsMode::On),
            Ok(false) => Some(TlsMode::Off),
            Err(_) => {
                bail!("--tls: could not decipher '{t}': expected off, on or require")
            }
        },
    };
    if asked == Some(TlsMode::Off) {
        return Ok((None, TlsMode::Off));
    }
    let creds = if let Some(psk) = &cli.tls_psk {
        Some(ServerTls::psk(psk).map_err(|e| anyhow!("--tls-psk: {e}"))?)
    } else {
        let dir = cli
            .tls_certificates
            .clone()
            .or_else(ServerTls::default_certificates_dir);
        match dir {
            // Given or found: files that do not load are an error.
            Some(d) => Some(
                ServerTls::x509(&d, cli.tls_verify_peer)
                    .map_err(|e| anyhow!("TLS certificates: {e}"))?,
            ),
            None => None,
        }
    };
    match (creds, asked) {
        (Some(c), Some(TlsMode::Require)) => Ok((Some(Arc::new(c)), TlsMode::Require)),
        (Some(c), _) => Ok((Some(Arc::new(c)), TlsMode::On)),
        (None, Some(TlsMode::Require)) => bail!(
            "--tls=require but could not load TLS certificates.\n\
             Try setting '--tls-certificates=/path/to/certificates' or read\n\
             the \"TLS\" section in nbdkit(1).",
        ),
        (None, Some(_)) => {
            libnbd::elog!(
                "nbdkit: warning: --tls=on but could not load TLS certificates: TLS is off"
            );
            Ok((None, TlsMode::Off))
        }
        (None, None) => Ok((None, TlsMode::Off)),
    }
}

/// Bind the listening sockets (before forking, so the server is reachable
/// as soon as the parent returns).
fn bind(cli: &Cli) -> Result<Listen> {
    if cli.single {
        return Ok(Listen::Single);
    }
    if let Some(fds) = listen::activation_fds() {
        // Safety: socket activation hands these fds to us to own.
        let fds = fds
            .into_iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
            .collect();
        return Ok(Listen::Sockets {
            fds,
            uri: None,
            tmpdir: None,
            unlink: None,
        });
    }
    if let Some(path) = &cli.unix {
        let (path, tmpdir, unlink) = if path.as_os_str() == "-" {
            let dir = tempfile::Builder::new().prefix("nbdkit").tempdir()?;
            (dir.path().join("socket"), Some(dir), None)
        } else {
            // A stale socket from an earlier run would make bind fail.
            if let Ok(m) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if m.file_type().is_socket() {
                    let _ = std::fs::remove_file(path);
                }
            }
            (path.clone(), None, Some(path.clone()))
        };
        let l = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| anyhow!("bind: {}: {e}", path.display()))?;
        return Ok(Listen::Sockets {
            fds: vec![l.into()],
            uri: Some(UriInfo {
                port: None,
                unixsocket: Some(path),
            }),
            tmpdir,
            unlink,
        });
    }
    let port: u16 = match &cli.port {
        None => 10809,
        Some(p) => p
            .parse()
            .map_err(|_| anyhow!("-p {p}: port must be a number from 0 to 65535"))?,
    };
    let addrs: Vec<IpAddr> = match &cli.ipaddr {
        Some(a) => {
            let a = a.trim_start_matches('[').trim_end_matches(']');
            match a.parse::<IpAddr>() {
                Ok(ip) => vec![ip],
                Err(_) => {
                    use std::net::ToSocketAddrs;
                    (a, port)
                        .to_socket_addrs()
                        .map_err(|e| anyhow!("-i {a}: {e}"))?
                        .map(|s| s.ip())
                        .collect()
                }
            }
        }
        None => vec![
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        ],
    };
    let addrs: Vec<IpAddr> = addrs
        .into_iter()
        .filter(|a| !(cli.ipv4_only && a.is_ipv6() || cli.ipv6_only && a.is_ipv4()))
        .collect();
    let mut fds = Vec::new();
    let mut errors = Vec::new();
    for ip in addrs {
        match bind_tcp(SocketAddr::new(ip, port)) {
            Ok(fd) => fds.push(fd),
            Err(e) => errors.push(format!("{ip}: {e}")),
        }
    }
    if fds.is_empty() {
        bail!(
            "unable to bind to any sockets on port {port}: {}",
            errors.join("; ")
        );
    }
    Ok(Listen::Sockets {
        fds,
        uri: Some(UriInfo {
            port: Some(port),
            unixsocket: None,
        }),
        tmpdir: None,
        unlink: None,
    })
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{
        bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
        SockaddrStorage,
    };
    let family = if addr.is_ipv6() {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        // Keep IPv4 on its own socket, as nbdkit does.
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

fn set_exit_with_parent() -> Result<()> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .map_err(|e| anyhow!("--exit-with-parent: prctl: {e}"))?;
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        bail!("--exit-with-parent: the parent has already exited");
    }
    Ok(())
}

fn write_pidfile(p: &std::path::Path) -> Result<()> {
    let tmp = p.with_extension("tmp-nbdkit");
    let mut f = std::fs::File::create(&tmp).map_err(|e| anyhow!("{}: {e}", p.display()))?;
    writeln!(f, "{}", std::process::id())?;
    drop(f);
    std::fs::rename(&tmp, p).map_err(|e| anyhow!("{}: {e}", p.display()))?;
    Ok(())
}

/// Fork into the background. The parent exits 0 only once the child has
/// written its pidfile, so a caller can rely on it at once.
fn daemonize(pidfile: Option<&std::path::Path>) -> Result<()> {
    let (rd, wr) = nix::unistd::pipe()?;
    // Safety: no threads exist yet (the runtime starts after this).
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(wr);
            let mut b = [0u8; 1];
            let n = nix::unistd::read(rd.as_raw_fd(), &mut b).unwrap_or(0);
            std::process::exit(if n == 1 && b[0] == 0 { 0 } else { 1 });
        }
        nix::unistd::ForkResult::Child => {
            drop(rd);
            let _ = nix::unistd::setsid();
            let ok = match pidfile.map(write_pidfile) {
                Some(Err(e)) => {
                    libnbd::elog!("nbdkit: error: {}", cli::error_message(&e));
                    false
                }
                _ => true,
            };
            let _ = nix::unistd::write(&wr, &[if ok { 0 } else { 1 }]);
            if !ok {
                std::process::exit(1);
            }
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                let _ = nix::unistd::dup2(null.as_raw_fd(), 0);
                let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
            }
            Ok(())
        }
    }
}

/// `$uri` for `--run`: `nbds` when TLS is required, as nbdkit's.
fn make_uri(info: &UriInfo, export: &str, tls: bool) -> String {
    let enc = percent_encode(export);
    let s = if tls { "s" } else { "" };
    match (&info.unixsocket, info.port) {
        (Some(sock), _) => {
            let sock = percent_encode_query(&sock.to_string_lossy());
            if export.is_empty() {
                format!("nbd{s}+unix://?socket={sock}")
            } else {
                format!("nbd{s}+unix:///{enc}?socket={sock}")
            }
        }
        (None, Some(p)) => {
            if export.is_empty() {
                format!("nbd{s}://localhost:{p}")
            } else {
                format!("nbd{s}://localhost:{p}/{enc}")
            }
        }
        (None, None) => String::new(),
    }
}

/// Everything but unreserved characters and `/` is escaped in the path
/// of `$uri`; the query (the socket path) keeps `:` too.
const PATH: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');
const QUERY: &percent_encoding::AsciiSet = &PATH.remove(b':');

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, PATH).to_string()
}

fn percent_encode_query(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, QUERY).to_string()
}

async fn serve(
    cfg: Arc<ServerConfig>,
    listen: Listen,
    cli: &Cli,
    tls_mode: TlsMode,
) -> Result<i32> {
    let server = cfg.server.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).expect("signal");
        let mut term = signal(SignalKind::terminate()).expect("signal");
        let mut quit = signal(SignalKind::quit()).expect("signal");
        let mut hup = signal(SignalKind::hangup()).expect("signal");
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
            _ = quit.recv() => {}
            _ = hup.recv() => {}
        }
        server.request_shutdown();
    });
    match listen {
        Listen::Single => {
            serve_stdio(cfg).await;
            Ok(0)
        }
        Listen::Sockets {
            fds,
            uri,
            tmpdir,
            unlink,
        } => {
            let mut servers = Vec::new();
            for fd in fds {
                let raw: RawFd = std::os::fd::IntoRawFd::into_raw_fd(fd);
                let l = Listener::from_fd(raw)?;
                servers.push(tokio::spawn(l.run(cfg.clone())));
            }
            let code = match (&cli.run, &uri) {
                (Some(cmd), Some(info)) => {
                    let code = run_command(
                        &cfg.server,
                        cmd,
                        info,
                        cli.exportname.as_deref().unwrap_or(""),
                        tls_mode,
                    )
                    .await?;
                    cfg.server.request_shutdown();
                    code
                }
                (Some(_), None) => {
                    bail!("--run cannot be used with socket activation");
                }
                (None, _) => {
                    cfg.server.shutdown_requested().await;
                    0
                }
            };
            for s in servers {
                let _ = s.await;
            }
            if let Some(p) = unlink {
                let _ = std::fs::remove_file(p);
            }
            drop(tmpdir);
            Ok(code)
        }
    }
}

/// Serve one client on stdin/stdout (`-s`). When stdin is a socket (as
/// with `nbdsh`'s connect-command) it is used directly for speed.
async fn serve_stdio(cfg: Arc<ServerConfig>) {
    let is_socket = nix::sys::stat::fstat(0)
        .map(|s| s.st_mode & libc::S_IFMT == libc::S_IFSOCK)
        .unwrap_or(false);
    if is_socket {
        // Safety: fd 0 is ours; dup it so the std stdin handle stays valid.
        if let Ok(fd) = nix::unistd::dup(0) {
            let s = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
            if s.set_nonblocking(true).is_ok() {
                if let Ok(s) = tokio::net::UnixStream::from_std(s) {
                    let peer = server::Peer {
                        addr: None,
                        cred: libnbd::PeerCred::of_socket(fd),
                    };
                    let (r, w) = s.into_split();
                    server::serve(cfg, r, w, peer).await;
                    return;
                }
            }
        }
    }
    let peer = server::Peer::default();
    server::serve(cfg, tokio::io::stdin(), tokio::io::stdout(), peer).await;
}

/// Run `--run CMD` under `sh -c` with the URI variables set; returns the
/// exit status nbdkit should exit with.
async fn run_command(
    server: &ServerContext,
    cmd: &str,
    info: &UriInfo,
    export: &str,
    tls: TlsMode,
) -> Result<i32> {
    let uri = make_uri(info, export, tls == TlsMode::Require);
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(cmd);
    c.env("uri", &uri)
        .env("nbd", &uri)
        .env("exportname", export);
    match info.port {
        Some(p) => c.env("port", p.to_string()),
        None => c.env("port", ""),
    };
    match &info.unixsocket {
        Some(s) => c.env("unixsocket", s),
        None => c.env("unixsocket", ""),
    };
    match tls {
        TlsMode::Off => c.env_remove("tls"),
        TlsMode::On => c.env("tls", "1"),
        TlsMode::Require => c.env("tls", "2"),
    };
    let mut child = c.spawn().map_err(|e| anyhow!("--run: /bin/sh: {e}"))?;
    let status = tokio::select! {
        s = child.wait() => s?,
        _ = server.shutdown_requested() => {
            // We were told to stop (a signal): let the command go too.
            let _ = child.start_kill();
            child.wait().await?
        }
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => {
            libnbd::elog!("nbdkit: external command was killed by signal {sig}");
            128 + sig
        }
        _ => 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_forms() {
        let unix = UriInfo {
            port: None,
            unixsocket: Some("/tmp/x/socket".into()),
        };
        assert_eq!(
            make_uri(&unix, "", false),
            "nbd+unix://?socket=/tmp/x/socket"
        );
        assert_eq!(
            make_uri(&unix, "a b", false),
            "nbd+unix:///a%20b?socket=/tmp/x/socket"
        );
        assert_eq!(
            make_uri(&unix, "", true),
            "nbds+unix://?socket=/tmp/x/socket"
        );
        let tcp = UriInfo {
            port: Some(10809),
            unixsocket: None,
        };
        assert_eq!(make_uri(&tcp, "foo", false), "nbd://localhost:10809/foo");
        assert_eq!(make_uri(&tcp, "", false), "nbd://localhost:10809");
        assert_eq!(make_uri(&tcp, "", true), "nbds://localhost:10809");
    }

    #[test]
    fn in_process_only_with_stack_options() {
        let ok = |a: &str| {
            let args: Vec<OsString> = a.split_whitespace().map(OsString::from).collect();
            stack_only_cli(&args).is_some()
        };
        assert!(ok("memory 1G"));
        assert!(ok("--filter=qcow2 -r -f file x.qcow2 create=true"));
        assert!(ok("--no-mc -t 4 -e foo memory 1G"));
        for a in [
            "-v memory 1G",
            "-U - memory 1G",
            "--tls=on memory 1G",
            "-D nbdkit.backend.datapath=0 memory 1G",
            "--run true memory 1G",
            "-P pid memory 1G",
            "--exit-with-parent memory 1G",
            "--bogus memory 1G",
        ] {
            assert!(!ok(a), "{a}");
        }
    }

    #[test]
    fn cli_interleaves_options_and_params() {
        let cli = Cli::try_parse_from([
            "nbdkit",
            "-U",
            "-",
            "memory",
            "1G",
            "--run",
            "nbdinfo $uri",
            "--filter=log",
        ])
        .unwrap();
        assert_eq!(cli.unix.as_deref(), Some(std::path::Path::new("-")));
        assert_eq!(
            cli.words,
            vec![OsString::from("memory"), OsString::from("1G")]
        );
        assert_eq!(cli.run.as_deref(), Some("nbdinfo $uri"));
        assert_eq!(cli.filters, vec!["log"]);
    }
}
