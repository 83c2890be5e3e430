//! # log: log every transaction to a file or a script
//!
//! As the first filter it shows the client's requests; lower in the stack
//! it shows how the filters above changed them. The file has the same
//! lines as nbdkit 1.32's log filter, so tools that read those logs read
//! ours:
//!
//! ```text
//! 2020-08-06 02:07:23.080415 ListExports id=1 readonly=0 tls=0 ...
//! 2020-08-06 02:07:23.080502 ...ListExports id=1 exports=("") return=0
//! 2020-08-06 02:07:23.080712 connection=1 Connect export="" tls=0 size=0x400 minsize=0x0 prefsize=0x0 maxsize=0x0 write=1 flush=1 rotational=0 trim=1 zero=2 fua=2 extents=1 cache=2 fast_zero=1
//! 2020-08-06 02:07:23.080907 connection=1 Read id=1 offset=0x0 count=0x200 ...
//! 2020-08-06 02:07:23.080927 connection=1 ...Read id=1 return=0
//! 2020-08-06 02:07:23.081255 connection=1 Disconnect transactions=1
//! ```
//!
//! Each line starts with the local time (`YYYY-MM-DD HH:MM:SS.microseconds`).
//! Calls of a connection carry `connection=N`, numbering the handles this
//! filter opened from 1 (a client that asks for `NBD_OPT_INFO` before
//! `NBD_OPT_GO` opens two). Actions: `Ready`, `Fork`, `Preconnect`,
//! `ListExports`, `Connect`, `Read`, `Write`, `Zero`, `Trim`, `Extents`,
//! `Cache`, `Flush` and `Disconnect`. A request is logged on entry
//! (`Read id=N offset=0x.. count=0x.. ...`) and on return (`...Read id=N
//! return=0`, or `return=-1 error=EIO`); ids count from 1 per connection
//! and correlate the two lines. Write shows `fua=0|1`, Zero `trim=`,
//! `fua=` and `fast=`, Trim `fua=`, Extents `req_one=` and on return the
//! list `extents=(OFFSET LENGTH "TYPE" ...)` with TYPE `""`, `"hole"`,
//! `"zero"` or `"hole,zero"`. `Connect` lists the export's capabilities
//! (`zero`, `fua` and `cache` as 0 none, 1 emulated, 2 native).
//! Strings and lists are shell-quoted.
//!
//! With `logscript=SCRIPT` every log entry also runs SCRIPT under `bash`
//! (in order, off the request path, its output going to stderr) with the
//! shell variables `$act`, `$type` (`ENTER`, `LEAVE` or `PRINT`),
//! `$connection`, `$id`, `$return`, `$error` and one per field of the
//! line (`$offset`, `$count`, ...; `$extents` is a bash array). Its exit
//! status is ignored.
//!
//! ```text
//! nbdkit --filter=log file disk.img logfile=disk.log
//! nbdkit -f --filter=log memory 10M logscript='echo $act $offset >&2'
//! ```
//!
//! ## Parameters
//!
//! If neither `logfile` nor `logscript` is given the filter
//! does nothing.
//!
//! - `logfile=FILE`: the file to write the log to.
//! - `logappend=BOOL`: append to FILE instead of truncating it (default
//!   false).
//! - `logscript=SCRIPT`: run SCRIPT for every log entry.
//!
//! The log filter may be used more than once in a stack: each of these
//! keys goes to the first log filter (nearest the client) that has not
//! taken one yet, so `--filter=log --filter=offset --filter=log ...
//! logfile=outer.log logfile=inner.log` logs both sides of the offset
//! filter.
//!
//! Differences from nbdkit 1.32, due to how this server is built: `Ready`
//! always says `thread_model=3` (this server runs requests in parallel)
//! and is logged with `Fork` once the server is up (nbdkit omits `Fork`
//! with `-f`); `Preconnect` is logged when a connection opens its first
//! export, so after a `ListExports` of the same connection rather than
//! before it; and zeroes that nbdkit's server would emulate by writes
//! above this filter reach it as `Zero`.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use async_trait::async_trait;
use libnbd::protocol::{alloc, errno};
use libnbd::{
    Cache, Caps, ConfigError, ConfigResult, ExportEntry, Extents, Filter, FilterEntry, Flags, Fua,
    Handle, Next, OpenContext, Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "log",
    help: "\
logfile=<FILE>               The file to place the log in.
logappend=<BOOL>             True to append to the log (default false).
logscript=<SCRIPT>           Script to run for logging.",
    create,
};

/// Remove the first `key=` parameter (leaving later ones for another
/// instance of this filter further down the stack).
fn take_first(p: &mut Params, key: &str) -> Option<String> {
    let i = p.items().iter().position(|(k, _)| k == key)?;
    let mut items = p.items().to_vec();
    let (_, v) = items.remove(i);
    *p = Params::new(items);
    Some(v)
}

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let logfile = take_first(p, "logfile");
    let logscript = take_first(p, "logscript");
    let append = match take_first(p, "logappend") {
        Some(v) => {
            libnbd::parse_bool(&v).map_err(|e| ConfigError::new(format!("logappend: {e}")))?
        }
        None => false,
    };
    let file = match &logfile {
        None => None,
        Some(path) if path.is_empty() => {
            return Err(ConfigError::new("logfile: the file name is empty"))
        }
        Some(path) => {
            let mut o = std::fs::OpenOptions::new();
            o.create(true);
            if append {
                o.append(true);
            } else {
                o.write(true).truncate(true);
            }
            let f = o
                .open(path)
                .map_err(|e| ConfigError::new(format!("open: {path}: {e}")))?;
            Some(Mutex::new(f))
        }
    };
    Ok(Arc::new(LogFilter {
        log: Arc::new(Logger {
            file,
            script: logscript,
            runner: Mutex::new(None),
            connections: AtomicU64::new(0),
            preconnects: AtomicU64::new(0),
            listings: AtomicU64::new(0),
            seen: Mutex::new(VecDeque::new()),
        }),
    }))
}

/// The three kinds of log entries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A call being made: `Act id=N args ...`.
    Enter,
    /// A call returning: `...Act id=N args`.
    Leave,
    /// A single event: `Act args`.
    Print,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Enter => "ENTER",
            Kind::Leave => "LEAVE",
            Kind::Print => "PRINT",
        }
    }
}

/// Runs the log script for each entry, in order, on its own thread.
struct Runner {
    tx: mpsc::SyncSender<String>,
    thread: std::thread::JoinHandle<()>,
}

/// How many server connection ids we remember having logged
/// `Preconnect` for.
const SEEN: usize = 256;

/// Where the entries go, shared by the filter and its handles.
struct Logger {
    file: Option<Mutex<std::fs::File>>,
    script: Option<String>,
    /// Started at the first entry that needs the script.
    runner: Mutex<Option<Runner>>,
    /// Handles opened (the `connection=` numbers).
    connections: AtomicU64,
    /// Ids of `Preconnect` entries.
    preconnects: AtomicU64,
    /// Ids of `ListExports` entries.
    listings: AtomicU64,
    /// Server connection ids already given a `Preconnect` entry.
    seen: Mutex<VecDeque<u64>>,
}

/// The local time as the log prints it.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as libc::time_t;
    // Safety: localtime_r only writes the tm we pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = !unsafe { libc::localtime_r(&secs, &mut tm) }.is_null();
    if !ok {
        return format!("{}.{:06}", now.as_secs(), now.subsec_micros());
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        now.subsec_micros()
    )
}

/// Quote a string for the shell as nbdkit's log does: bare if it is made
/// only of safe characters, else in double quotes with `$`, `` ` ``, `"`
/// and `\` escaped.
pub(crate) fn shell_quote(s: &str) -> String {
    let safe = |b: u8| b.is_ascii_alphanumeric() || b",=:/._-".contains(&b);
    if !s.is_empty() && s.bytes().all(safe) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if matches!(c, '$' | '`' | '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The name of a wire errno, as the log prints it.
fn errno_name(e: u32) -> &'static str {
    match e {
        errno::EPERM => "EPERM",
        errno::EIO => "EIO",
        errno::ENOMEM => "ENOMEM",
        errno::EINVAL => "EINVAL",
        errno::ENOSPC => "ENOSPC",
        errno::EOVERFLOW => "EOVERFLOW",
        errno::ENOTSUP => "ENOTSUP",
        errno::ESHUTDOWN => "ESHUTDOWN",
        _ => "EINVAL",
    }
}

fn run_scripts(rx: mpsc::Receiver<String>) {
    use std::os::fd::AsFd;
    use std::process::{Command, Stdio};
    // The script's output goes to stderr: stdout may be the NBD
    // connection (`-s`).
    let to_stderr = || {
        std::io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null())
    };
    let mut shell = "bash";
    for text in rx {
        let run = |shell: &str| {
            Command::new(shell)
                .arg("-c")
                .arg(&text)
                .stdin(Stdio::null())
                .stdout(to_stderr())
                .status()
        };
        match run(shell) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && shell == "bash" => {
                shell = "sh";
                let _ = run(shell);
            }
            Err(e) => libnbd::elog!("nbdkit: log: logscript: {e}"),
            Ok(_) => {}
        }
    }
}

impl Logger {
    /// Log one entry to the file and the script.
    fn emit(&self, conn: Option<u64>, act: &str, kind: Kind, id: Option<u64>, args: &str) {
        if let Some(f) = &self.file {
            let mut line = timestamp();
            line.push(' ');
            if let Some(c) = conn {
                let _ = write!(line, "connection={c} ");
            }
            if kind == Kind::Leave {
                line.push_str("...");
            }
            line.push_str(act);
            if let Some(id) = id {
                let _ = write!(line, " id={id}");
            }
            if !args.is_empty() {
                line.push(' ');
                line.push_str(args);
            }
            if kind == Kind::Enter {
                line.push_str(" ...");
            }
            line.push('\n');
            if let Ok(mut f) = f.lock() {
                let _ = f.write_all(line.as_bytes());
            }
        }
        if let Some(script) = &self.script {
            let mut text = format!("act={act}\n");
            if let Some(c) = conn {
                let _ = writeln!(text, "connection={c}");
            }
            let _ = writeln!(text, "type={}", kind.name());
            if let Some(id) = id {
                let _ = writeln!(text, "id={id}");
            }
            text.push_str(args);
            text.push('\n');
            text.push_str(script);
            self.run_script(text);
        }
    }

    fn run_script(&self, text: String) {
        let Ok(mut runner) = self.runner.lock() else {
            return;
        };
        if runner.is_none() {
            let (tx, rx) = mpsc::sync_channel(1024);
            match std::thread::Builder::new()
                .name("log-script".into())
                .spawn(move || run_scripts(rx))
            {
                Ok(thread) => *runner = Some(Runner { tx, thread }),
                Err(e) => {
                    libnbd::elog!("nbdkit: log: cannot start the logscript thread: {e}");
                    return;
                }
            }
        }
        if let Some(r) = runner.as_ref() {
            let _ = r.tx.send(text);
        }
    }

    /// Wait for the scripts queued so far.
    fn finish_scripts(&self) {
        let r = self.runner.lock().ok().and_then(|mut r| r.take());
        if let Some(Runner { tx, thread }) = r {
            drop(tx);
            let _ = thread.join();
        }
    }

    /// Is this the first time server connection `id` opens an export?
    fn first_open(&self, id: u64) -> bool {
        let Ok(mut seen) = self.seen.lock() else {
            return true;
        };
        if seen.contains(&id) {
            return false;
        }
        if seen.len() >= SEEN {
            seen.pop_front();
        }
        seen.push_back(id);
        true
    }

    /// `return=0` or `return=-1 error=EIO`, after `extra` on success.
    fn result<T>(r: &Result<T>, extra: &str) -> String {
        match r {
            Ok(_) => format!("{extra}return=0"),
            Err(e) => format!("return=-1 error={}", errno_name(e.errno)),
        }
    }
}

struct LogFilter {
    log: Arc<Logger>,
}

fn b(v: bool) -> u8 {
    v as u8
}

#[async_trait]
impl Filter for LogFilter {
    fn passes_meta_contexts(&self) -> bool {
        // Same offsets and data: the plugin's other contexts stay true.
        true
    }
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let log = &self.log;
        if log.file.is_none() && log.script.is_none() {
            // Inactive: stay out of the request path.
            return next.open(ctx).await;
        }
        if log.first_open(ctx.id) {
            let id = log.preconnects.fetch_add(1, Ordering::Relaxed) + 1;
            let args = format!("readonly={}", b(ctx.readonly));
            log.emit(None, "Preconnect", Kind::Enter, Some(id), &args);
            log.emit(None, "Preconnect", Kind::Leave, Some(id), "return=0");
        }
        let h = next.open(ctx).await?;
        let conn = log.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let bs = h.block_size().ok().flatten();
        let caps = h.caps().unwrap_or(Caps::READ_ONLY);
        let write = !ctx.readonly && caps.write;
        let zero = write && caps.zero;
        let args = format!(
            "export={} tls={} size={:#x} minsize={:#x} prefsize={:#x} maxsize={:#x} \
             write={} flush={} rotational={} trim={} zero={} fua={} extents={} cache={} fast_zero={}",
            shell_quote(&ctx.export_name),
            b(ctx.tls),
            h.size().unwrap_or(0),
            bs.map_or(0, |b| b.minimum),
            bs.map_or(0, |b| b.preferred),
            bs.map_or(0, |b| b.maximum),
            b(write),
            b(caps.flush),
            b(caps.rotational),
            b(write && caps.trim),
            if zero { 2 } else { 0 },
            match caps.fua {
                _ if !write => 0,
                Fua::Native => 2,
                Fua::Emulate => 1,
                Fua::None => 0,
            },
            b(caps.extents),
            match caps.cache {
                Cache::Native => 2,
                Cache::Emulate => 1,
                Cache::None => 0,
            },
            b(zero && caps.fast_zero),
        );
        log.emit(Some(conn), "Connect", Kind::Print, None, &args);
        Ok(Box::new(LogHandle {
            next: h,
            log: log.clone(),
            conn,
            ids: AtomicU64::new(0),
        }))
    }

    async fn list_exports(&self, next: Next<'_>, readonly: bool) -> Result<Vec<ExportEntry>> {
        let id = self.log.listings.fetch_add(1, Ordering::Relaxed) + 1;
        let args = format!("readonly={} tls=0", b(readonly));
        self.log
            .emit(None, "ListExports", Kind::Enter, Some(id), &args);
        let r = next.list_exports(readonly).await;
        let extra = match &r {
            Ok(list) => {
                let names: Vec<String> = list.iter().map(|e| shell_quote(&e.name)).collect();
                format!("exports=({}) ", names.join(" "))
            }
            Err(_) => String::new(),
        };
        let args = Logger::result(&r, &extra);
        self.log
            .emit(None, "ListExports", Kind::Leave, Some(id), &args);
        r
    }

    fn after_fork(&self, _: &Arc<libnbd::server::ServerContext>) -> Result<()> {
        self.log
            .emit(None, "Ready", Kind::Print, None, "thread_model=3");
        self.log.emit(None, "Fork", Kind::Print, None, "");
        Ok(())
    }

    fn unload(&self) {
        self.log.finish_scripts();
    }
}

struct LogHandle {
    next: Box<dyn Handle>,
    log: Arc<Logger>,
    /// Our `connection=` number.
    conn: u64,
    /// Requests so far (the last id given).
    ids: AtomicU64,
}

impl LogHandle {
    fn enter(&self, act: &str, args: &str) -> u64 {
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        self.log
            .emit(Some(self.conn), act, Kind::Enter, Some(id), args);
        id
    }

    fn leave<T>(&self, act: &str, id: u64, r: &Result<T>) {
        let args = Logger::result(r, "");
        self.log
            .emit(Some(self.conn), act, Kind::Leave, Some(id), &args);
    }
}

impl Drop for LogHandle {
    fn drop(&mut self) {
        let args = format!("transactions={}", self.ids.load(Ordering::Relaxed));
        self.log
            .emit(Some(self.conn), "Disconnect", Kind::Print, None, &args);
    }
}

fn extent_type(flags: u32) -> &'static str {
    match (flags & alloc::HOLE != 0, flags & alloc::ZERO != 0) {
        (false, false) => "",
        (true, false) => "hole",
        (false, true) => "zero",
        (true, true) => "hole,zero",
    }
}

#[async_trait]
impl Handle for LogHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }

    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let args = format!("offset={offset:#x} count={:#x}", buf.len());
        let id = self.enter("Read", &args);
        let r = self.next.pread(buf, offset, flags).await;
        self.leave("Read", id, &r);
        r
    }

    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let args = format!(
            "offset={offset:#x} count={:#x} fua={}",
            buf.len(),
            b(flags.contains(Flags::FUA))
        );
        let id = self.enter("Write", &args);
        let r = self.next.pwrite(buf, offset, flags).await;
        self.leave("Write", id, &r);
        r
    }

    async fn flush(&self, flags: Flags) -> Result<()> {
        let id = self.enter("Flush", "");
        let r = self.next.flush(flags).await;
        self.leave("Flush", id, &r);
        r
    }

    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let args = format!(
            "offset={offset:#x} count={count:#x} fua={}",
            b(flags.contains(Flags::FUA))
        );
        let id = self.enter("Trim", &args);
        let r = self.next.trim(count, offset, flags).await;
        self.leave("Trim", id, &r);
        r
    }

    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let args = format!(
            "offset={offset:#x} count={count:#x} trim={} fua={} fast={}",
            b(flags.contains(Flags::MAY_TRIM)),
            b(flags.contains(Flags::FUA)),
            b(flags.contains(Flags::FAST_ZERO))
        );
        let id = self.enter("Zero", &args);
        let r = self.next.zero(count, offset, flags).await;
        self.leave("Zero", id, &r);
        r
    }

    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let args = format!(
            "offset={offset:#x} count={count:#x} req_one={}",
            b(flags.contains(Flags::REQ_ONE))
        );
        let id = self.enter("Extents", &args);
        let before = ext.list().len();
        let r = self.next.extents(count, offset, flags, ext).await;
        let extra = if r.is_ok() {
            let mut s = String::from("extents=(");
            for (i, e) in ext.list()[before.min(ext.list().len())..]
                .iter()
                .enumerate()
            {
                if i > 0 {
                    s.push(' ');
                }
                let _ = write!(
                    s,
                    "{:#x} {:#x} \"{}\"",
                    e.offset,
                    e.length,
                    extent_type(e.flags)
                );
            }
            s.push_str(") ");
            s
        } else {
            String::new()
        };
        let args = Logger::result(&r, &extra);
        self.log
            .emit(Some(self.conn), "Extents", Kind::Leave, Some(id), &args);
        r
    }

    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let args = format!("offset={offset:#x} count={count:#x}");
        let id = self.enter("Cache", &args);
        let r = self.next.cache(count, offset, flags).await;
        self.leave("Cache", id, &r);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    fn lines(path: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                // Drop the timestamp: "YYYY-MM-DD HH:MM:SS.uuuuuu ".
                assert_eq!(&l[4..5], "-", "{l}");
                assert_eq!(&l[19..20], ".", "{l}");
                l[27..].to_string()
            })
            .collect()
    }

    #[test]
    fn log_shell_quote() {
        assert_eq!(shell_quote(""), "\"\"");
        assert_eq!(shell_quote("a,b=c:d/e.f_g-h"), "a,b=c:d/e.f_g-h");
        assert_eq!(shell_quote("a b"), "\"a b\"");
        assert_eq!(shell_quote("a+b"), "\"a+b\"");
        assert_eq!(shell_quote("a$b\"c\\d`e"), "\"a\\$b\\\"c\\\\d\\`e\"");
        assert_eq!(shell_quote("a'b"), "\"a'b\"");
    }

    #[tokio::test]
    async fn log_line_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.txt");
        let mut p = params(&[&format!("logfile={}", path.display())]);
        let f = create(&mut p).unwrap();
        let mut data = vec![0u8; 4096];
        data[..512].fill(1);
        let mem = Mem::with(data);
        let s = stack(vec![f.clone()], &mem);
        f.after_fork(&libnbd::server::ServerContext::new(false))
            .unwrap();
        let mut c = ctx(7);
        c.export_name = "a b".into();
        let h = s.open(&c).await.unwrap();
        try_read(&*h, 0, 512).await.unwrap();
        h.pwrite(&[1; 512], 512, Flags::FUA).await.unwrap();
        h.zero(1024, 1024, Flags::MAY_TRIM).await.unwrap();
        h.trim(512, 2048, Flags::NONE).await.unwrap();
        h.flush(Flags::NONE).await.unwrap();
        h.cache(4096, 0, Flags::NONE).await.unwrap();
        try_extents(&*h, 0, 4096).await.unwrap();
        mem.fail.store(1, Ordering::SeqCst);
        assert!(try_read(&*h, 0, 512).await.is_err());
        drop(h);
        let h = s.open(&c).await.unwrap();
        drop(h);
        let got = lines(&path);
        let want = [
            "Ready thread_model=3",
            "Fork",
            "Preconnect id=1 readonly=0 ...",
            "...Preconnect id=1 return=0",
            "connection=1 Connect export=\"a b\" tls=0 size=0x1000 minsize=0x0 prefsize=0x0 maxsize=0x0 write=1 flush=1 rotational=0 trim=1 zero=2 fua=2 extents=1 cache=2 fast_zero=1",
            "connection=1 Read id=1 offset=0x0 count=0x200 ...",
            "connection=1 ...Read id=1 return=0",
            "connection=1 Write id=2 offset=0x200 count=0x200 fua=1 ...",
            "connection=1 ...Write id=2 return=0",
            "connection=1 Zero id=3 offset=0x400 count=0x400 trim=1 fua=0 fast=0 ...",
            "connection=1 ...Zero id=3 return=0",
            "connection=1 Trim id=4 offset=0x800 count=0x200 fua=0 ...",
            "connection=1 ...Trim id=4 return=0",
            "connection=1 Flush id=5 ...",
            "connection=1 ...Flush id=5 return=0",
            "connection=1 Cache id=6 offset=0x0 count=0x1000 ...",
            "connection=1 ...Cache id=6 return=0",
            "connection=1 Extents id=7 offset=0x0 count=0x1000 req_one=0 ...",
            "connection=1 ...Extents id=7 extents=(0x0 0x400 \"\" 0x400 0xc00 \"hole,zero\") return=0",
            "connection=1 Read id=8 offset=0x0 count=0x200 ...",
            "connection=1 ...Read id=8 return=-1 error=EIO",
            "connection=1 Disconnect transactions=8",
            "connection=2 Connect export=\"a b\" tls=0 size=0x1000 minsize=0x0 prefsize=0x0 maxsize=0x0 write=1 flush=1 rotational=0 trim=1 zero=2 fua=2 extents=1 cache=2 fast_zero=1",
            "connection=2 Disconnect transactions=0",
        ];
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn log_readonly_connect_and_list_exports() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.txt");
        std::fs::write(&path, "old\n").unwrap();
        let mut p = params(&[&format!("logfile={}", path.display()), "logappend=true"]);
        let f = create(&mut p).unwrap();
        let mem = Mem::new(1024);
        let s = stack(vec![f], &mem);
        s.top().list_exports(true).await.unwrap();
        let mut c = ctx(1);
        c.readonly = true;
        drop(s.open(&c).await.unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        let mut it = text.lines();
        assert_eq!(it.next(), Some("old"));
        let rest: Vec<String> = it.map(|l| l[27..].to_string()).collect();
        assert_eq!(
            rest,
            [
                "ListExports id=1 readonly=1 tls=0 ...",
                "...ListExports id=1 exports=(\"\") return=0",
                "Preconnect id=1 readonly=1 ...",
                "...Preconnect id=1 return=0",
                "connection=1 Connect export=\"\" tls=0 size=0x400 minsize=0x0 prefsize=0x0 maxsize=0x0 write=0 flush=1 rotational=0 trim=0 zero=0 fua=0 extents=1 cache=2 fast_zero=0",
                "connection=1 Disconnect transactions=0",
            ]
        );
    }

    #[tokio::test]
    async fn log_script_gets_variables() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        let script = format!(
            "echo \"$type|$act|$connection|$id|$offset|$count|$return|$error|${{#extents[@]}}\" >> {}",
            out.display()
        );
        let mut p = params(&[&format!("logscript={script}")]);
        let f = create(&mut p).unwrap();
        let mem = Mem::new(1024);
        let s = stack(vec![f.clone()], &mem);
        let h = s.open(&ctx(1)).await.unwrap();
        try_read(&*h, 512, 512).await.unwrap();
        mem.fail.store(1, Ordering::SeqCst);
        assert!(try_extents(&*h, 0, 1024).await.is_err());
        try_extents(&*h, 0, 1024).await.unwrap();
        drop(h);
        f.unload();
        let text = std::fs::read_to_string(&out).unwrap();
        let got: Vec<&str> = text.lines().map(|l| l.trim_end()).collect();
        assert_eq!(
            got,
            [
                "ENTER|Preconnect||1|||||0",
                "LEAVE|Preconnect||1|||0||0",
                "PRINT|Connect|1||||||1",
                "ENTER|Read|1|1|0x200|0x200|||0",
                "LEAVE|Read|1|1|||0||0",
                "ENTER|Extents|1|2|0x0|0x400|||0",
                "LEAVE|Extents|1|2|||-1|EIO|0",
                "ENTER|Extents|1|3|0x0|0x400|||0",
                "LEAVE|Extents|1|3|||0||3",
                "PRINT|Disconnect|1||||||0",
            ]
        );
    }

    #[test]
    fn log_keys_go_to_the_first_log_filter() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let bpath = dir.path().join("b");
        let mut p = params(&[
            &format!("logfile={}", a.display()),
            "offset=1",
            &format!("logfile={}", bpath.display()),
        ]);
        create(&mut p).unwrap();
        assert!(a.exists() && !bpath.exists());
        create(&mut p).unwrap();
        assert!(bpath.exists());
        assert_eq!(p.items(), &[("offset".to_string(), "1".to_string())]);
        // Without a file or script the filter is inactive but valid.
        assert!(create(&mut params(&[])).is_ok());
        assert!(create(&mut params(&["logappend=maybe"])).is_err());
    }
}
