//! # sh: a plugin written as a shell script (or any executable)
//!
//! Every plugin method is a run of the script with the method's name and
//! its arguments: `SCRIPT pread HANDLE COUNT OFFSET` prints the data on
//! stdout, `SCRIPT pwrite HANDLE COUNT OFFSET FLAGS` reads it from stdin,
//! and so on for each method of nbdkit-plugin(3). The script may be any
//! executable; one without a `#!` line runs under `/bin/sh`.
//!
//! ```text
//! nbdkit sh ./disk.sh
//! nbdkit sh - <<'EOF'
//!   case "$1" in
//!     get_size) echo 1M ;;
//!     pread) dd if=/dev/zero count=$3 iflag=count_bytes ;;
//!     *) exit 2 ;;
//!   esac
//! EOF
//! ```
//!
//! ## Parameters
//!
//! - `[script=]SCRIPT` (required, first): the script's path, or `-` to
//!   read an inline script from stdin (saved as
//!   `$tmpdir/inline-script.sh`; not with `-s`).
//! - Any other `key=value` is passed in order to the script as
//!   `SCRIPT config KEY VALUE`; a bare word after the script is given the
//!   key the script's `magic_config_key` prints.
//!
//! ## Exit codes
//!
//! 0 is success (true for the `can_*` and `is_*` methods); 1 and 8-127
//! an error, where a first word on stderr such as `ENOSPC`, `EPERM`,
//! `EIO`, `EINVAL`, `ENOMEM`, `ESHUTDOWN`, `ENOTSUP`, `EROFS`, `EDQUOT`,
//! `EFBIG` (any case) picks the error sent to the client and the rest is
//! the message (else the error is `EIO`); 2 means the method is missing;
//! 3 is false. Codes 4 to 7 are reserved and are errors;
//! `--dump-plugin` says `max_known_status=3`.
//!
//! ## Methods
//!
//! `load`, `magic_config_key`, `config KEY VALUE`, `config_complete`,
//! `thread_model`, `get_ready`, `after_fork`, `preconnect READONLY`,
//! `list_exports READONLY TLS`, `default_export READONLY TLS`, `open
//! READONLY EXPORTNAME TLS` (prints the handle), `close`, `get_size`,
//! `block_size`, `export_description`, the `can_*` and `is_rotational`
//! questions, `pread COUNT OFFSET`, `pwrite COUNT OFFSET FLAGS`, `flush`,
//! `trim COUNT OFFSET FLAGS`, `zero COUNT OFFSET FLAGS`, `extents COUNT
//! OFFSET FLAGS`, `cache COUNT OFFSET`, `dump_plugin` and `unload`; every
//! per-connection method gets the handle first. Flags are comma-separated
//! words: `fua` (pwrite, trim, zero), `may_trim` and `fast` (zero),
//! `req_one` (extents). Booleans are `true` or `false`.
//!
//! ## Behaviour
//!
//! - A fresh `$tmpdir` exists for the server's lifetime and is removed
//!   when it exits; scripts keep their state there.
//! - Only `get_size` and `pread` are required. As nbdkit's sh plugin, a
//!   missing `can_*` is false (so `pwrite` needs `can_write`, and so on),
//!   except that a missing `can_zero` still gets zero emulated by writes,
//!   a missing `can_fua` is `emulate` when flush is available, and a
//!   missing `can_cache` is `none`. Missing `flush`, `trim` and `cache`
//!   succeed; a missing `zero` falls back to `pwrite`; missing `extents`
//!   (with `can_extents` true) is an error.
//! - The `can_*` methods run once per connection, when it opens.
//! - The thread model is `serialize_all_requests` unless the script's
//!   `thread_model` prints another (`parallel`, `serialize_requests`,
//!   `serialize_connections`); calls are serialised as it asks. Scripts
//!   run as child processes off the reactor: under `parallel` a script
//!   that hangs holds up only its own request.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use libnbd::{ConfigError, ConfigResult, Params, Plugin, PluginEntry};

use crate::script::{chomp, strerror, Engine, Methods, Script, ScriptPlugin};

/// The registry entry of the sh plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "sh",
    help: "script=<FILENAME>     (required) The shell script to run.\n\
           [other arguments may be used by the plugin that you load]",
    magic: Some("script"),
    create,
};

/// A fresh `$tmpdir` (`/tmp/nbdkitXXXXXX`, or under `$TMPDIR`).
pub(crate) fn make_tmpdir() -> ConfigResult<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("nbdkit")
        .tempdir()
        .map_err(|e| ConfigError::new(format!("mkdtemp: {}", strerror(&e))))
}

/// Write an executable script file.
pub(crate) fn write_script(path: &Path, body: &[u8]) -> ConfigResult<()> {
    let err = |e: std::io::Error| ConfigError::new(format!("{}: {}", path.display(), strerror(&e)));
    std::fs::write(path, body).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)
}

/// Build the sh plugin: load the script, ask its magic config key and
/// pass it every other parameter, in order.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let items = params.take_rest();
    let Some(((key, script), rest)) = items.split_first() else {
        // No script: enough for `--dump-plugin`; the server stops at
        // get_ready with "missing script parameter".
        return Ok(Arc::new(ScriptPlugin::new(Engine::new(
            "sh",
            Methods::One(None),
            false,
            None,
        ))));
    };
    if key != "script" {
        return Err(ConfigError::new(
            "the first parameter must be script=/path/to/script",
        ));
    }
    let tmpdir = make_tmpdir()?;
    let path = if script == "-" {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body).map_err(|e| {
            ConfigError::new(format!("reading script from stdin: {}", strerror(&e)))
        })?;
        let path = tmpdir.path().join("inline-script.sh");
        write_script(&path, &body)?;
        path
    } else {
        std::fs::canonicalize(script)
            .map_err(|e| ConfigError::new(format!("realpath: {script}: {}", strerror(&e))))?
    };
    let engine = Engine::new(
        "sh",
        Methods::One(Some(Script::new(path.clone()))),
        false,
        Some(tmpdir),
    );
    engine.config_call("load", &[])?;
    let magic = engine
        .config_call("magic_config_key", &[])?
        .map(|out| chomp(&out))
        .filter(|k| !k.is_empty());
    for (key, value) in rest {
        // The server gives every bare word the key `script`; after the
        // script itself such a word belongs to the script's magic key.
        let key = match (key.as_str(), &magic) {
            ("script", Some(m)) => m.as_str(),
            ("script", None) => {
                return Err(ConfigError::new(format!(
                    "{}: expecting key=value on the command line but got: {value}",
                    path.display()
                )))
            }
            (k, _) => k,
        };
        if engine.config_call("config", &[key, value])?.is_none() {
            return Err(ConfigError::new(format!(
                "{}: this plugin does not need command line configuration",
                path.display()
            )));
        }
    }
    Ok(Arc::new(ScriptPlugin::new(engine)))
}
