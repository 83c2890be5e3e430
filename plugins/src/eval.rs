//! # eval: a plugin written as shell snippets on the command line
//!
//! The [`sh`](crate::sh) plugin's engine with each method's script given
//! as a parameter instead of one script file: `get_size='echo 64M'`
//! becomes the file `$tmpdir/get_size` (run by `/bin/sh`), called with the
//! same arguments, stdin, stdout, exit codes and errors as an sh script's
//! method.
//!
//! ```text
//! nbdkit eval get_size='echo 64M' pread='dd if=/dev/zero count=$3 iflag=count_bytes'
//! nbdkit eval \
//!   config='ln -sf "$(realpath "$3")" $tmpdir/file' \
//!   get_size='stat -Lc %s $tmpdir/file' \
//!   pread='dd if=$tmpdir/file skip=$4 count=$3 iflag=count_bytes,skip_bytes' \
//!   pwrite='dd of=$tmpdir/file seek=$4 conv=notrunc oflag=seek_bytes' \
//!   file=disk.img
//! ```
//!
//! ## Parameters
//!
//! - `after_fork=`, `block_size=`, `cache=`, `can_cache=`, `can_extents=`,
//!   `can_fast_zero=`, `can_flush=`, `can_fua=`, `can_multi_conn=`,
//!   `can_trim=`, `can_write=`, `can_zero=`, `close=`, `config=`,
//!   `config_complete=`, `default_export=`, `dump_plugin=`,
//!   `export_description=`, `extents=`, `flush=`, `get_ready=`,
//!   `get_size=SCRIPT`, `is_rotational=`, `list_exports=`, `open=`,
//!   `pread=SCRIPT`, `preconnect=`, `pwrite=`, `thread_model=`, `trim=`,
//!   `unload=`, `zero=`: the script of each method (all optional; a
//!   method may be given once).
//! - `missing=SCRIPT`: run in place of every method not given (default
//!   `exit 2`).
//! - Any other `key=value` is passed to the `config` script as `config
//!   KEY VALUE`, in order; `config=` must come before the keys it
//!   handles, and without it an unknown key is an error.
//!
//! ## Behaviour
//!
//! As the sh plugin's, except that there is no `load` method, and a
//! `can_*` method that is not given answers whether its method is:
//! `can_write` is true when `pwrite` is given, likewise `can_flush`
//! (`flush`), `can_trim` (`trim`), `can_zero` (`zero`), `can_extents`
//! (`extents`), and `can_cache` is `native` when `cache` is given.
//! `$tmpdir` holds the method scripts and is removed when the server
//! exits.

use std::sync::Arc;

use libnbd::{ConfigError, ConfigResult, Params, Plugin, PluginEntry};

use crate::script::{Engine, Methods, Script, ScriptPlugin};
use crate::sh::{make_tmpdir, write_script};

/// The registry entry of the eval plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "eval",
    help: "get_size=' SCRIPT '\n\
           pread=' SCRIPT '\n\
           [etc]",
    magic: None,
    create,
};

/// The methods a parameter may give a script.
const METHODS: &[&str] = &[
    "after_fork",
    "block_size",
    "cache",
    "can_cache",
    "can_extents",
    "can_fast_zero",
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_trim",
    "can_write",
    "can_zero",
    "close",
    "config",
    "config_complete",
    "default_export",
    "dump_plugin",
    "export_description",
    "extents",
    "flush",
    "get_ready",
    "get_size",
    "is_rotational",
    "list_exports",
    "open",
    "pread",
    "preconnect",
    "pwrite",
    "thread_model",
    "trim",
    "unload",
    "zero",
];

/// Build the eval plugin: write each method's script into `$tmpdir` and
/// pass the other parameters to `config`, in command-line order.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let tmpdir = make_tmpdir()?;
    let dir = tmpdir.path().to_path_buf();
    let missing = dir.join("missing");
    write_script(&missing, b"#!/bin/sh\nexit 2\n")?;
    let mut engine = Engine::new(
        "eval",
        Methods::Each {
            given: Default::default(),
            missing: Script::new(missing.clone()),
            missing_given: false,
        },
        true,
        Some(tmpdir),
    );
    for (key, value) in params.take_rest() {
        if key == "missing" || METHODS.contains(&key.as_str()) {
            let path = dir.join(&key);
            write_script(&path, format!("#!/bin/sh\n{value}\n").as_bytes())?;
            if !engine.define(&key, Script::new(path)) {
                return Err(ConfigError::new(format!(
                    "method {key} defined more than once on the command line"
                )));
            }
        } else if engine.config_call("config", &[&key, &value])?.is_none() {
            return Err(ConfigError::new(format!(
                "{}: callback '{key}' is unknown, and there is no 'config' callback to handle it",
                engine.path("config").display()
            )));
        }
    }
    Ok(Arc::new(ScriptPlugin::new(engine)))
}
