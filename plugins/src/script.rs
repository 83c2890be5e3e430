//! The engine of the [`sh`](crate::sh) and [`eval`](crate::eval)
//! plugins: every plugin method is a run of a script, `SCRIPT METHOD
//! ARGS...`, whose exit status says done (0), error (1, with an errno
//! name on stderr), missing (2) or false (3). `sh` has one script for all
//! methods; `eval` has one per method given on the command line and
//! infers the `can_*` answers from which methods exist.
//!
//! Scripts run as child processes on the runtime (tokio::process), so a
//! script that hangs holds up only its own request; the thread model the
//! script asks for (`serialize_all_requests` unless it says otherwise)
//! is honoured by locks taken around each call. The `can_*` methods run
//! once per connection, when it opens, and their answers are kept.

mod call;
mod output;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use libnbd::protocol::errno;
use libnbd::{
    BlockSize, Cache, Caps, ConfigError, ConfigResult, Error, ExportEntry, Extents, Flags, Fua,
    Handle, OpenContext, Plugin, Result, ThreadModel,
};
use tokio::sync::{MutexGuard, OwnedSemaphorePermit, Semaphore};

use call::{bool_word, flag_words, Output, EXTENTS_FLAGS, WRITE_FLAGS, ZERO_FLAGS};
pub use call::{strerror, Script, Status};
pub use output::chomp;

/// Which script answers each method.
pub enum Methods {
    /// `sh`: one script answers every method (`None` until `script=`).
    One(Option<Script>),
    /// `eval`: a script per method given; `missing` stands in for the
    /// others (`exit 2` unless `missing=` was given, and then it is not
    /// even run).
    Each {
        /// The methods given, by name.
        given: HashMap<String, Script>,
        /// The `missing` script (its path names errors of methods not given).
        missing: Script,
        /// Was `missing=` given?
        missing_given: bool,
    },
}

/// What a method resolves to.
enum Target<'a> {
    /// Run this script.
    Run(&'a Script),
    /// Missing without running anything; errors name this path.
    Missing(&'a Path),
}

/// The state shared by the plugin and its connections.
pub struct Engine {
    /// `sh` or `eval`, in messages.
    name: &'static str,
    /// The scripts.
    methods: Methods,
    /// `eval`: a `can_*` method that is missing answers whether its
    /// method was given (`can_write` if `pwrite` was, ...).
    infer: bool,
    /// `$tmpdir`, removed at unload; `None` for `sh` without a script.
    tmpdir: Mutex<Option<tempfile::TempDir>>,
    /// Its path, as scripts get it.
    tmppath: PathBuf,
    /// The thread model, asked once (after `config_complete`, or when
    /// `--dump-plugin` wants it).
    model: OnceLock<ThreadModel>,
    /// Held around every call under `serialize_all_requests` (and
    /// `serialize_connections`).
    all: tokio::sync::Mutex<()>,
    /// One permit: the connection that holds it may run, under
    /// `serialize_connections`.
    conns: Arc<Semaphore>,
    /// `close` calls running (a thread each): unload waits for them, as
    /// nbdkit closes its connections before it unloads the plugin.
    closes: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// The server's `-r`, as `preconnect` and `list_exports` learn it
    /// (for `default_export`, whose contract method has no arguments).
    readonly: AtomicBool,
    /// `unload` ran.
    unloaded: AtomicBool,
}

impl Engine {
    /// An engine for `name` with these scripts and `$tmpdir`.
    pub fn new(
        name: &'static str,
        methods: Methods,
        infer: bool,
        tmpdir: Option<tempfile::TempDir>,
    ) -> Engine {
        Engine {
            name,
            methods,
            infer,
            tmppath: tmpdir
                .as_ref()
                .map(|t| t.path().to_path_buf())
                .unwrap_or_default(),
            tmpdir: Mutex::new(tmpdir),
            model: OnceLock::new(),
            all: tokio::sync::Mutex::new(()),
            conns: Arc::new(Semaphore::new(1)),
            closes: Mutex::new(Vec::new()),
            readonly: AtomicBool::new(false),
            unloaded: AtomicBool::new(false),
        }
    }

    /// `eval`: give `method` (or `missing`) its script; false if it
    /// already has one.
    pub fn define(&mut self, method: &str, script: Script) -> bool {
        let Methods::Each {
            given,
            missing,
            missing_given,
        } = &mut self.methods
        else {
            return false;
        };
        if method == "missing" {
            let fresh = !*missing_given;
            (*missing, *missing_given) = (script, true);
            fresh
        } else {
            given.insert(method.to_string(), script).is_none()
        }
    }

    /// `$tmpdir`.
    pub fn tmpdir(&self) -> &Path {
        &self.tmppath
    }

    fn target(&self, method: &str) -> Target<'_> {
        match &self.methods {
            Methods::One(Some(s)) => Target::Run(s),
            Methods::One(None) => Target::Missing(Path::new(self.name)),
            Methods::Each {
                given,
                missing,
                missing_given,
            } => match given.get(method) {
                Some(s) => Target::Run(s),
                None if *missing_given => Target::Run(missing),
                None => Target::Missing(&missing.path),
            },
        }
    }

    /// The script that answers `method` (named in its errors).
    pub fn path(&self, method: &str) -> &Path {
        match self.target(method) {
            Target::Run(s) => &s.path,
            Target::Missing(p) => p,
        }
    }

    /// Was `method` given its own script (`eval`)?
    fn given(&self, method: &str) -> bool {
        matches!(&self.methods, Methods::Each { given, .. } if given.contains_key(method))
    }

    /// An error about `method`: `SCRIPT: message`.
    pub fn error(&self, method: &str, errno: u32, msg: impl std::fmt::Display) -> Error {
        Error::new(errno, format!("{}: {msg}", self.path(method).display()))
    }

    /// The error for a status a method may not answer with.
    pub fn unexpected(&self, method: &str, st: Status) -> Error {
        let code = match st {
            Status::Ok => "0/ok",
            Status::Missing => "2/missing",
            Status::False => "3/false",
        };
        self.error(
            method,
            errno::EIO,
            format!("{method} method returned unexpected code ({code})"),
        )
    }

    /// Run `method`, blocking this thread.
    pub fn call_blocking(&self, method: &str, args: &[&str]) -> Result<Output> {
        match self.target(method) {
            Target::Run(s) => s.call_blocking(&self.tmppath, method, args),
            Target::Missing(_) => Ok((Status::Missing, Vec::new())),
        }
    }

    async fn call(&self, method: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        match self.target(method) {
            Target::Run(s) => s.call(&self.tmppath, method, args, stdin).await,
            Target::Missing(_) => Ok((Status::Missing, Vec::new())),
        }
    }

    async fn call_into(
        &self,
        method: &str,
        args: &[&str],
        buf: &mut [u8],
    ) -> Result<(Status, u64)> {
        match self.target(method) {
            Target::Run(s) => s.call_into(&self.tmppath, method, args, buf).await,
            Target::Missing(_) => Ok((Status::Missing, 0)),
        }
    }

    /// A configuration-time method that may be missing: its output, or
    /// `None` when missing.
    pub fn config_call(&self, method: &str, args: &[&str]) -> ConfigResult<Option<Vec<u8>>> {
        match self.call_blocking(method, args) {
            Ok((Status::Ok, out)) => Ok(Some(out)),
            Ok((Status::Missing, _)) => Ok(None),
            Ok((st, _)) => Err(ConfigError::new(self.unexpected(method, st).msg)),
            Err(e) => Err(ConfigError::new(e.msg)),
        }
    }

    /// The thread model: what the script's `thread_model` says, else
    /// `serialize_all_requests` (`parallel` for `sh` without a script, as
    /// `nbdkit --dump-plugin sh` reports).
    fn model(&self) -> ThreadModel {
        *self.model.get_or_init(|| {
            self.ask_model()
                .unwrap_or(ThreadModel::SerializeAllRequests)
        })
    }

    fn ask_model(&self) -> ConfigResult<ThreadModel> {
        if matches!(self.methods, Methods::One(None)) {
            return Ok(ThreadModel::Parallel);
        }
        // An answer nbdkit does not know is ignored, as upstream.
        Ok(self
            .config_call("thread_model", &[])?
            .and_then(|out| output::thread_model(&out))
            .unwrap_or(ThreadModel::SerializeAllRequests))
    }

    fn serialises_all(&self) -> bool {
        matches!(
            self.model(),
            ThreadModel::SerializeConnections | ThreadModel::SerializeAllRequests
        )
    }

    /// The lock around a call outside any connection.
    async fn lock_all(&self) -> Option<MutexGuard<'_, ()>> {
        match self.serialises_all() {
            true => Some(self.all.lock().await),
            false => None,
        }
    }

    /// The same lock, from blocking code: a thread of our own, or work
    /// moved off the runtime by [`blocking`] (a current-thread runtime,
    /// as in unit tests, cannot block, and runs no other request then).
    fn lock_all_blocking(&self) -> Option<MutexGuard<'_, ()>> {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let blockable = Handle::try_current()
            .map_or(true, |h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        (self.serialises_all() && blockable).then(|| self.all.blocking_lock())
    }

    /// `config_complete`, `thread_model` and `get_ready`, in nbdkit's
    /// order.
    fn get_ready(&self) -> ConfigResult<()> {
        if matches!(self.methods, Methods::One(None)) {
            return Err(ConfigError::new("missing script parameter"));
        }
        self.config_call("config_complete", &[])?;
        let model = self.ask_model()?;
        let _ = self.model.set(model);
        self.config_call("get_ready", &[])?;
        Ok(())
    }

    /// Run `unload` once (its errors are ignored) and remove `$tmpdir`,
    /// after the connections' `close` calls have finished.
    fn unload(&self) {
        if self.unloaded.swap(true, Ordering::SeqCst) {
            return;
        }
        let closes = std::mem::take(&mut *self.closes.lock().unwrap_or_else(|e| e.into_inner()));
        let me = std::thread::current().id();
        for t in closes {
            // The last reference to the engine may go in a close thread.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        let _ = self.call_blocking("unload", &[]);
        drop(self.tmpdir.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.unload();
    }
}

/// The first name of an export list (`""` for an empty one).
fn first_name(out: &[u8]) -> String {
    output::exports(out)
        .into_iter()
        .next()
        .map(|e| e.name)
        .unwrap_or_default()
}

/// Borrow arguments as the calls take them.
fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Run blocking work from a synchronous contract method that is called
/// on the runtime, without stalling its other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A plugin whose methods are scripts.
pub struct ScriptPlugin {
    engine: Arc<Engine>,
}

impl ScriptPlugin {
    /// The plugin of a configured engine.
    pub fn new(engine: Engine) -> ScriptPlugin {
        ScriptPlugin {
            engine: Arc::new(engine),
        }
    }
}

#[async_trait]
impl Plugin for ScriptPlugin {
    async fn open(&self, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        match ScriptHandle::open(self.engine.clone(), ctx).await {
            Ok(h) => Ok(Box::new(h)),
            Err(e) => {
                // As nbdkit_error: the reason goes to the log; the client
                // only learns that the export could not be opened.
                libnbd::elog!("nbdkit: {}[{}]: error: {}", self.engine.name, ctx.id, e.msg);
                Err(e)
            }
        }
    }

    async fn list_exports(&self, readonly: bool) -> Result<Vec<ExportEntry>> {
        let e = &self.engine;
        e.readonly.store(readonly, Ordering::Relaxed);
        let answer = {
            let _g = e.lock_all().await;
            e.call("list_exports", &[bool_word(readonly), "false"], None)
                .await?
        };
        match answer {
            (Status::Ok, out) => Ok(output::exports(&out)),
            // The empty name stands for the default export.
            (Status::Missing, _) => Ok(vec![ExportEntry {
                name: String::new(),
                description: None,
            }]),
            (st, _) => Err(e.unexpected("list_exports", st)),
        }
    }

    fn default_export(&self) -> String {
        let e = &self.engine;
        let readonly = bool_word(e.readonly.load(Ordering::Relaxed));
        let answer = blocking(|| {
            let _g = e.lock_all_blocking();
            e.call_blocking("default_export", &[readonly, "false"])
        });
        match answer {
            Ok((Status::Ok, out)) => first_name(&out),
            Ok((Status::Missing, _)) => String::new(),
            Ok((st, _)) => {
                libnbd::elog!(
                    "nbdkit: {}: error: {}",
                    e.name,
                    e.unexpected("default_export", st).msg
                );
                String::new()
            }
            Err(err) => {
                libnbd::elog!("nbdkit: {}: error: {}", e.name, err.msg);
                String::new()
            }
        }
    }

    fn thread_model(&self) -> ThreadModel {
        self.engine.model()
    }

    fn dump(&self) -> Vec<(String, String)> {
        let e = &self.engine;
        let mut lines = vec![("max_known_status".to_string(), "3".to_string())];
        match e.config_call("dump_plugin", &[]) {
            Ok(Some(out)) => lines.extend(
                String::from_utf8_lossy(&out)
                    .lines()
                    .map(|l| (String::new(), l.to_string())),
            ),
            Ok(None) => {}
            Err(err) => libnbd::elog!("nbdkit: error: {err}"),
        }
        lines
    }

    fn get_ready(&self) -> ConfigResult<()> {
        self.engine.get_ready()
    }

    fn after_fork(&self, _server: &std::sync::Arc<libnbd::server::ServerContext>) -> Result<()> {
        match self.engine.config_call("after_fork", &[]) {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::eio(e.0)),
        }
    }

    async fn preconnect(&self, readonly: bool) -> Result<()> {
        let e = &self.engine;
        e.readonly.store(readonly, Ordering::Relaxed);
        let _g = e.lock_all().await;
        match e.call("preconnect", &[bool_word(readonly)], None).await? {
            (Status::Ok | Status::Missing, _) => Ok(()),
            (st, _) => Err(e.unexpected("preconnect", st)),
        }
    }

    fn unload(&self) {
        self.engine.unload();
    }
}

/// A connection's handle string and locks; `close` runs when it drops.
struct Conn {
    engine: Arc<Engine>,
    /// What `open` printed, passed to every later call.
    handle: String,
    /// Held around every call under `serialize_requests`.
    lock: tokio::sync::Mutex<()>,
    /// Under `serialize_connections`: this connection's turn, until its
    /// `close` has run.
    permit: Option<OwnedSemaphorePermit>,
    /// `open` succeeded, so `close` is due.
    opened: bool,
}

impl Conn {
    /// Take the locks the thread model asks for, in one order.
    async fn serialise(&self) -> (Option<MutexGuard<'_, ()>>, Option<MutexGuard<'_, ()>>) {
        let all = self.engine.lock_all().await;
        let one = match self.engine.model() {
            ThreadModel::Parallel => None,
            _ => Some(self.lock.lock().await),
        };
        (all, one)
    }

    /// Run `method HANDLE ARGS...`.
    async fn call(&self, method: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        let _g = self.serialise().await;
        let mut all = vec![self.handle.as_str()];
        all.extend_from_slice(args);
        self.engine.call(method, &all, stdin).await
    }

    /// A yes/no method: `None` when missing.
    async fn boolean(&self, method: &str) -> Result<Option<bool>> {
        Ok(match self.call(method, &[], None).await?.0 {
            Status::Ok => Some(true),
            Status::False => Some(false),
            Status::Missing => None,
        })
    }

    /// A method that prints a word (`can_fua`, `can_cache`): `None` when
    /// missing.
    async fn word<T>(&self, method: &str, parse: fn(&[u8]) -> Option<T>) -> Result<Option<T>> {
        match self.call(method, &[], None).await? {
            (Status::Ok, out) => parse(&out).map(Some).ok_or_else(|| {
                self.engine.error(
                    method,
                    errno::EIO,
                    format!(
                        "could not parse output from {method} method: {}",
                        chomp(&out)
                    ),
                )
            }),
            (Status::Missing, _) => Ok(None),
            (st, _) => Err(self.engine.unexpected(method, st)),
        }
    }

    /// `eval`: a `can_*` method not given whose method is answers yes
    /// without running anything (not even `missing`), as upstream's eval
    /// writes such a script itself.
    fn implied(&self, can: &str, method: &str) -> bool {
        let e = &self.engine;
        e.infer && !e.given(can) && e.given(method)
    }

    /// A yes/no capability that `method`'s presence implies for `eval`.
    async fn can(&self, can: &str, method: &str) -> Result<Option<bool>> {
        match self.implied(can, method) {
            true => Ok(Some(true)),
            false => self.boolean(can).await,
        }
    }

    /// The capabilities, asked in nbdkit's order (the write-related ones
    /// only of a writable connection). A missing answer falls back as
    /// nbdkit's: false (or, for `eval`, whether the method was given),
    /// fast zero when zero is emulated, FUA emulated when there is flush,
    /// no cache. Also whether zero is to be emulated although `Caps`
    /// says it is native (`zero_by_writes` of the handle).
    async fn caps(&self, readonly: bool) -> Result<(Caps, bool)> {
        let write = !readonly && self.can("can_write", "pwrite").await?.unwrap_or(false);
        let (mut zero, mut fast_zero, mut trim, mut fua) = (false, false, false, None);
        if write {
            zero = self.can("can_zero", "zero").await?.unwrap_or(false);
            fast_zero = self.boolean("can_fast_zero").await?.unwrap_or(!zero);
            trim = self.can("can_trim", "trim").await?.unwrap_or(false);
            fua = self.word("can_fua", output::fua).await?;
        }
        let flush = self.can("can_flush", "flush").await?.unwrap_or(false);
        let fua = match fua {
            Some(f) => f,
            None if write && flush => Fua::Emulate,
            None => Fua::None,
        };
        let rotational = self.boolean("is_rotational").await?.unwrap_or(false);
        let multi_conn = self.boolean("can_multi_conn").await?.unwrap_or(false);
        let cache = match self.implied("can_cache", "cache") {
            true => Cache::Native,
            false => self
                .word("can_cache", output::cache)
                .await?
                .unwrap_or(Cache::None),
        };
        let extents = self.can("can_extents", "extents").await?.unwrap_or(false);
        // No zero and no fast zero: the server would still advertise a
        // fast zero that fails at once (its answer for a plugin without
        // zero), where nbdkit takes the script's "no". Claim zero and
        // answer every zero with ENOTSUP: the server writes zeroes then,
        // and refuses the fast zero nobody was offered.
        let by_writes = write && !zero && !fast_zero;
        let caps = Caps {
            write,
            flush,
            rotational,
            trim,
            zero: zero || by_writes,
            fast_zero,
            extents,
            fua,
            multi_conn,
            cache,
        };
        Ok((caps, by_writes))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let permit = self.permit.take();
        if !self.opened {
            return;
        }
        let engine = self.engine.clone();
        let handle = std::mem::take(&mut self.handle);
        // Off the runtime: Drop cannot wait, and a slow close script must
        // not stall a worker.
        let t = std::thread::Builder::new()
            .name("nbdkit-close".into())
            .spawn(move || {
                let guard = engine.lock_all_blocking();
                if let Err(e) = engine.call_blocking("close", &[&handle]) {
                    libnbd::elog!("nbdkit: {}: error: {}", engine.name, e.msg);
                }
                drop(guard);
                drop(permit);
            });
        if let Ok(t) = t {
            let mut closes = self.engine.closes.lock().unwrap_or_else(|e| e.into_inner());
            closes.retain(|t| !t.is_finished());
            closes.push(t);
        }
    }
}

/// A connection: its handle string and what was asked when it opened.
pub struct ScriptHandle {
    conn: Conn,
    size: u64,
    caps: Caps,
    /// `zero` is never run: the script said no to zero and to fast zero
    /// (`caps.zero` is set only to keep the server from offering fast
    /// zero).
    zero_by_writes: bool,
    block_size: Option<BlockSize>,
    /// `export_description`, asked when a client first wants it.
    description: OnceLock<Option<String>>,
}

impl ScriptHandle {
    /// `open`, then `get_size`, the capabilities and `block_size`, in
    /// nbdkit's order.
    async fn open(engine: Arc<Engine>, ctx: &OpenContext) -> Result<ScriptHandle> {
        let permit = match engine.model() {
            ThreadModel::SerializeConnections => Some(
                engine
                    .conns
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::eio("shutting down"))?,
            ),
            _ => None,
        };
        let mut conn = Conn {
            engine,
            handle: String::new(),
            lock: tokio::sync::Mutex::new(()),
            permit,
            opened: false,
        };
        let args = [
            bool_word(ctx.readonly),
            ctx.export_name.as_str(),
            bool_word(ctx.tls),
        ];
        let answer = {
            let _g = conn.serialise().await;
            conn.engine.call("open", &args, None).await?
        };
        conn.handle = match answer {
            (Status::Ok, out) => chomp(&out),
            (Status::Missing, _) => String::new(),
            (st, _) => return Err(conn.engine.unexpected("open", st)),
        };
        conn.opened = true;
        let e = conn.engine.clone();
        let size = match conn.call("get_size", &[], None).await? {
            (Status::Ok, out) => output::size(&out).ok_or_else(|| {
                e.error(
                    "get_size",
                    errno::EIO,
                    format!(
                        "could not parse output from get_size method: {}",
                        chomp(&out)
                    ),
                )
            })?,
            (Status::Missing, _) => {
                return Err(e.error("get_size", errno::EIO, "the get_size method is required"))
            }
            (st, _) => return Err(e.unexpected("get_size", st)),
        };
        let (caps, zero_by_writes) = conn.caps(ctx.readonly).await?;
        let block_size = match conn.call("block_size", &[], None).await? {
            (Status::Ok, out) => {
                output::block_size(&out).map_err(|m| e.error("block_size", errno::EIO, m))?
            }
            (Status::Missing, _) => None,
            (st, _) => return Err(e.unexpected("block_size", st)),
        };
        Ok(ScriptHandle {
            conn,
            size,
            caps,
            zero_by_writes,
            block_size,
            description: OnceLock::new(),
        })
    }

    fn engine(&self) -> &Engine {
        &self.conn.engine
    }

    /// A data method that may be missing: `Ok(true)` done, `Ok(false)`
    /// missing.
    async fn data_call(&self, method: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<bool> {
        match self.conn.call(method, args, stdin).await?.0 {
            Status::Ok => Ok(true),
            Status::Missing => Ok(false),
            st => Err(self.engine().unexpected(method, st)),
        }
    }
}

#[async_trait]
impl Handle for ScriptHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(self.block_size)
    }
    fn export_description(&self) -> Option<String> {
        // Asked only when a client wants it, as nbdkit does: a
        // synchronous method of the contract, so the script runs
        // blocking, with the runtime's other tasks moved off this thread.
        let e = self.engine();
        self.description
            .get_or_init(|| {
                let handle = self.conn.handle.as_str();
                let answer = blocking(|| {
                    let _g = e.lock_all_blocking();
                    e.call_blocking("export_description", &[handle])
                });
                match answer {
                    Ok((Status::Ok, out)) => Some(chomp(&out)),
                    Ok((Status::Missing, _)) => None,
                    Ok((st, _)) => {
                        let msg = e.unexpected("export_description", st).msg;
                        libnbd::elog!("nbdkit: {}: error: {msg}", e.name);
                        None
                    }
                    Err(err) => {
                        libnbd::elog!("nbdkit: {}: error: {}", e.name, err.msg);
                        None
                    }
                }
            })
            .clone()
    }
    fn caps(&self) -> Result<Caps> {
        Ok(self.caps)
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        let e = self.engine();
        let (count, offset) = (buf.len().to_string(), offset.to_string());
        let (st, got) = {
            let _g = self.conn.serialise().await;
            let args = [self.conn.handle.as_str(), &count, &offset];
            e.call_into("pread", &args, buf).await?
        };
        match st {
            Status::Ok if got == buf.len() as u64 => Ok(()),
            Status::Ok => Err(e.error(
                "pread",
                errno::EIO,
                format!(
                    "incorrect amount of data read: expecting {} bytes but received {got} bytes from the script",
                    buf.len()
                ),
            )),
            Status::Missing => Err(e.error("pread", errno::EIO, "the pread method is required")),
            st => Err(e.unexpected("pread", st)),
        }
    }

    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let args = [
            buf.len().to_string(),
            offset.to_string(),
            flag_words(flags, WRITE_FLAGS),
        ];
        match self.data_call("pwrite", &strs(&args), Some(buf)).await? {
            true => Ok(()),
            false => Err(Error::eio("pwrite not implemented")),
        }
    }

    async fn flush(&self, _flags: Flags) -> Result<()> {
        // Missing: nothing to flush, as nbdkit's sh plugin takes it.
        self.data_call("flush", &[], None).await.map(drop)
    }

    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let args = [
            count.to_string(),
            offset.to_string(),
            flag_words(flags, WRITE_FLAGS),
        ];
        self.data_call("trim", &strs(&args), None).await.map(drop)
    }

    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if self.zero_by_writes {
            return Err(Error::enotsup("zero is emulated by pwrite"));
        }
        let args = [
            count.to_string(),
            offset.to_string(),
            flag_words(flags, ZERO_FLAGS),
        ];
        match self.data_call("zero", &strs(&args), None).await? {
            true => Ok(()),
            // The server falls back to writing zeroes (or fails a fast
            // zero at once).
            false => Err(Error::enotsup("zero falling back to pwrite")),
        }
    }

    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let args = [
            count.to_string(),
            offset.to_string(),
            flag_words(flags, EXTENTS_FLAGS),
        ];
        let e = self.engine();
        match self.conn.call("extents", &strs(&args), None).await? {
            (Status::Ok, out) => {
                output::extents(&out, ext).map_err(|err| e.error("extents", err.errno, err.msg))
            }
            (Status::Missing, _) => Err(e.error(
                "extents",
                errno::EIO,
                "can_extents returned true, but extents method is not defined",
            )),
            (st, _) => Err(e.unexpected("extents", st)),
        }
    }

    async fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        let args = [count.to_string(), offset.to_string()];
        self.data_call("cache", &strs(&args), None).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::Params;

    fn eval(words: &[&str]) -> Arc<dyn Plugin> {
        let mut p = Params::parse(words, None).unwrap();
        let plugin = crate::eval::ENTRY.configure(&mut p).unwrap();
        plugin.get_ready().unwrap();
        plugin
    }

    const BASE: [&str; 2] = ["get_size=echo 1M", "pread=head -c $3 /dev/zero"];

    async fn caps(words: &[&str]) -> Caps {
        let words: Vec<&str> = BASE.iter().chain(words).copied().collect();
        let h = eval(&words).open(&OpenContext::default()).await.unwrap();
        h.caps().unwrap()
    }

    #[tokio::test]
    async fn eval_infers_caps_from_the_methods_given() {
        let c = caps(&[]).await;
        assert_eq!(
            (c.write, c.flush, c.extents, c.cache),
            (false, false, false, Cache::None)
        );
        let c = caps(&[
            "pwrite=cat >/dev/null",
            "flush=true",
            "trim=true",
            "cache=true",
        ])
        .await;
        assert!(c.write && c.flush && c.trim && !c.zero && c.fast_zero);
        assert_eq!((c.fua, c.cache), (Fua::Emulate, Cache::Native));
        let c = caps(&["pwrite=cat >/dev/null", "zero=true", "extents=echo 0 1M"]).await;
        assert!(c.zero && !c.fast_zero && c.extents && !c.flush);
        assert_eq!(c.fua, Fua::None);
        // An explicit answer wins over the inference.
        let c = caps(&["pwrite=cat >/dev/null", "can_write=exit 3"]).await;
        assert!(!c.write);
        let c = caps(&[
            "can_fua=echo native",
            "can_write=exit 0",
            "can_multi_conn=exit 0",
        ])
        .await;
        assert_eq!((c.fua, c.multi_conn), (Fua::Native, true));
        // A read-only connection is not asked the write questions.
        let words: Vec<&str> = BASE.iter().chain(&["pwrite=exit 1"]).copied().collect();
        let ctx = OpenContext {
            readonly: true,
            ..Default::default()
        };
        assert!(!eval(&words).open(&ctx).await.unwrap().caps().unwrap().write);
    }

    #[tokio::test]
    async fn the_handle_from_open_reaches_later_calls() {
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        let close = format!("close=echo \"$2\" > {}", closed.display());
        let p = eval(&[
            "open=echo \"h-$3\"",
            "get_size=echo 1M",
            "pread=printf %s \"$2\" | head -c $3",
            &close,
        ]);
        let ctx = OpenContext {
            export_name: "xy".into(),
            ..Default::default()
        };
        let h = p.open(&ctx).await.unwrap();
        let mut buf = [0u8; 4];
        h.pread(&mut buf, 0, Flags::NONE).await.unwrap();
        assert_eq!(&buf, b"h-xy");
        drop(h);
        // unload waits for the close calls of the connections.
        p.unload();
        assert_eq!(std::fs::read_to_string(&closed).unwrap(), "h-xy\n");
    }

    #[tokio::test]
    async fn errors_and_missing_methods() {
        let p = eval(&[
            "get_size=echo 1M",
            "pread=echo ENOSPC no room >&2; exit 1",
            "can_write=exit 0",
        ]);
        let h = p.open(&OpenContext::default()).await.unwrap();
        let mut buf = [0u8; 4];
        let e = h.pread(&mut buf, 0, Flags::NONE).await.unwrap_err();
        assert_eq!(e.errno, errno::ENOSPC);
        assert!(e.msg.ends_with("/pread: no room"), "{}", e.msg);
        // pwrite missing although can_write is true: EIO, as nbdkit.
        assert_eq!(
            h.pwrite(b"x", 0, Flags::NONE).await.unwrap_err().errno,
            errno::EIO
        );
        // zero missing: ENOTSUP, for the server to fall back to writes.
        assert_eq!(
            h.zero(1, 0, Flags::NONE).await.unwrap_err().errno,
            errno::ENOTSUP
        );
        // flush, trim and cache missing: nothing to do.
        h.flush(Flags::NONE).await.unwrap();
        h.trim(1, 0, Flags::FUA).await.unwrap();
        h.cache(1, 0, Flags::NONE).await.unwrap();
        let mut ext = Extents::new(0, 512);
        assert_eq!(
            h.extents(512, 0, Flags::NONE, &mut ext)
                .await
                .unwrap_err()
                .errno,
            errno::EIO
        );
    }

    #[test]
    fn eval_configuration() {
        let bad = |w: &[&str]| {
            let mut p = Params::parse(w, None).unwrap();
            crate::eval::ENTRY.configure(&mut p).err().map(|e| e.0)
        };
        let e = bad(&["foo=bar"]).unwrap();
        assert!(e.ends_with("/missing: callback 'foo' is unknown, and there is no 'config' callback to handle it"), "{e}");
        let e = bad(&["get_size=echo 1", "get_size=echo 2"]).unwrap();
        assert_eq!(
            e,
            "method get_size defined more than once on the command line"
        );
        assert_eq!(bad(&["config=exit 0", "foo=bar"]), None);
        let e = bad(&["config=exit 3", "foo=bar"]).unwrap();
        assert!(
            e.ends_with("config method returned unexpected code (3/false)"),
            "{e}"
        );
        let e = bad(&["config=echo EINVAL bad key $2 >&2; exit 1", "foo=bar"]).unwrap();
        assert!(e.ends_with("/config: bad key foo"), "{e}");
    }

    #[test]
    fn thread_models() {
        let model = |w: &[&str]| {
            let mut p = Params::parse(w, None).unwrap();
            let plugin = crate::eval::ENTRY.configure(&mut p).unwrap();
            plugin.get_ready().unwrap();
            plugin.thread_model()
        };
        assert_eq!(model(&[]), ThreadModel::SerializeAllRequests);
        assert_eq!(
            model(&["thread_model=echo parallel"]),
            ThreadModel::Parallel
        );
        assert_eq!(
            model(&["thread_model=echo serialize_connections"]),
            ThreadModel::SerializeConnections
        );
        assert_eq!(
            model(&["thread_model=echo nonsense"]),
            ThreadModel::SerializeAllRequests
        );
        let mut p = Params::parse(&["thread_model=exit 1"], None).unwrap();
        assert!(crate::eval::ENTRY
            .configure(&mut p)
            .unwrap()
            .get_ready()
            .is_err());
        // sh without a script: parallel, as `nbdkit --dump-plugin sh`.
        let plugin = crate::sh::ENTRY.configure(&mut Params::default()).unwrap();
        assert_eq!(plugin.thread_model(), ThreadModel::Parallel);
        assert_eq!(
            plugin.get_ready().unwrap_err().0,
            "missing script parameter"
        );
        assert_eq!(plugin.dump(), [("max_known_status".into(), "3".into())]);
    }
}
