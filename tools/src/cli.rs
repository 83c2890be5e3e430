//! What the libnbd tools (`nbdinfo`, `nbddump`, `nbdcopy`) share on the
//! command line: the libnbd version they are compatible with, and the
//! start of `nbdinfo` and `nbddump` (help, version, argument errors,
//! the runtime).

/// The libnbd release whose tools these behave like.
pub const LIBNBD_VERSION: &str = "1.14.2";

/// What a command line asks for.
pub(crate) enum Parsed<T> {
    /// Do the work.
    Run(Box<T>),
    /// `--help`.
    Help,
    /// `--version`/`-V`.
    Version,
}

/// Answer `--help`, `--version` and argument errors as libnbd's tools do,
/// or start the runtime for the work. `Err` is the exit status when
/// there is nothing more to do.
pub(crate) fn start<T>(
    prog: &str,
    usage: &str,
    parsed: anyhow::Result<Parsed<T>>,
) -> Result<(Box<T>, tokio::runtime::Runtime), i32> {
    let cli = match parsed {
        Ok(Parsed::Run(cli)) => cli,
        Ok(Parsed::Help) => {
            print!("{usage}");
            return Err(0);
        }
        Ok(Parsed::Version) => {
            println!(
                "{prog} {LIBNBD_VERSION} (nbd-tools {})",
                env!("CARGO_PKG_VERSION")
            );
            println!("libnbd {LIBNBD_VERSION} (libnbd-rs)");
            return Err(0);
        }
        Err(e) => {
            eprintln!("{prog}: {}", crate::nbdinfo::error_message(&e));
            return Err(1);
        }
    };
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Ok((cli, rt)),
        Err(e) => {
            eprintln!("{prog}: cannot start the runtime: {e}");
            Err(1)
        }
    }
}
