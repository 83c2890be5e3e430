//! The handshake and option negotiation ("option mode").
//!
//! [`Negotiation`] is a connection that has done the initial handshake
//! (and asked for structured replies) but not chosen an export yet, like
//! a libnbd handle in option mode (`nbd_set_opt_mode`). From there a
//! client can list exports, list meta contexts, ask about several
//! exports, and finally [`go`](Negotiation::go) into transmission.

use std::any::Any;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};

use crate::backend::ExportEntry;
use crate::protocol::{
    self as p, be16, be32, be64, info, opt, rep, OptionReply, IHAVEOPT, MAX_OPTION_LEN, MAX_STRING,
    NBDMAGIC, OLDSTYLE_MAGIC,
};
use crate::uri::Uri;

use super::error::{Error, Result};
use super::stream::{BoxRead, BoxWrite, Stream, Transport};
use super::transmit::{Connection, Handover};
use super::types::{
    BlockSizes, ClientTlsOptions, ConnectOptions, ExportInfo, MetaContext, TlsPolicy,
    TransmissionFlags,
};
use crate::tls::{BoxIo, ClientTls, Joined};

/// Size of the read buffer of a connection.
const READ_BUFFER: usize = 128 * 1024;

/// Which handshake the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Oldstyle,
    Newstyle,
    FixedNewstyle,
}

impl Style {
    fn as_str(self) -> &'static str {
        match self {
            Style::Oldstyle => "oldstyle",
            Style::Newstyle => "newstyle",
            Style::FixedNewstyle => "newstyle-fixed",
        }
    }
}

/// The most meta contexts a server may select in one
/// `NBD_OPT_SET_META_CONTEXT` (real servers select a handful).
const MAX_META_CONTEXTS: usize = 10_000;

/// The most a server's answer to a list option (`NBD_OPT_LIST`,
/// `NBD_OPT_LIST_META_CONTEXT`) may hold in all: far above any real
/// server's (100,000 exports with short names take a few MB), and a bound
/// on what a hostile one can make us keep.
const MAX_LIST_BYTES: usize = 64 << 20;

/// Counts what a list option's replies have made us keep.
#[derive(Default)]
struct ListBudget(usize);

impl ListBudget {
    fn take(&mut self, payload: usize, what: &str) -> Result<()> {
        // Each entry also costs its bookkeeping, whatever its length.
        self.0 += payload + 32;
        if self.0 > MAX_LIST_BYTES {
            return Err(Error::Protocol(format!(
                "{what}: the server's list is larger than {} MiB",
                MAX_LIST_BYTES >> 20
            )));
        }
        Ok(())
    }
}

/// Objects kept alive as long as a connection (a captive server, ...).
pub(crate) type KeepAlive = Vec<Arc<dyn Any + Send + Sync>>;

/// A connection in the negotiation phase (libnbd's option mode).
///
/// ```no_run
/// # async fn f() -> libnbd::client::Result<()> {
/// use libnbd::client::{ConnectOptions, Negotiation};
/// let mut n = Negotiation::connect_uri("nbd://localhost", &ConnectOptions::new()).await?;
/// for e in n.list_exports().await? {
///     let info = n.info(&e.name).await?;
///     println!("{}: {} bytes", e.name, info.size);
/// }
/// n.abort().await
/// # }
/// ```
pub struct Negotiation {
    io: Option<(BufReader<BoxRead>, BoxWrite)>,
    socket: Option<OwnedFd>,
    opts: ConnectOptions,
    style: Style,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    oldstyle: Option<(u64, u16)>,
    transport: Option<Transport>,
    /// The URI we connected by (its TLS parameters go into `uri_for`).
    uri: Option<Uri>,
    /// TLS is running.
    tls: bool,
    keepalive: KeepAlive,
}

impl std::fmt::Debug for Negotiation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Negotiation")
            .field("protocol", &self.style.as_str())
            .field("structured_replies", &self.structured)
            .field("extended_headers", &self.extended)
            .field("transport", &self.transport)
            .field("open", &self.io.is_some())
            .finish()
    }
}

fn eof_context(e: io::Error, what: &str) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::io(
            format!("handshake: {what}"),
            io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"),
        )
    } else {
        Error::io(format!("handshake: {what}"), e)
    }
}

async fn read_exact(r: &mut BufReader<BoxRead>, buf: &mut [u8], what: &str) -> Result<()> {
    r.read_exact(buf)
        .await
        .map(|_| ())
        .map_err(|e| eof_context(e, what))
}

fn utf8(b: &[u8], what: &str) -> Result<String> {
    if b.len() > MAX_STRING {
        return Err(Error::Protocol(format!(
            "{what} of {} bytes is too long",
            b.len()
        )));
    }
    String::from_utf8(b.to_vec()).map_err(|_| Error::Protocol(format!("{what} is not valid UTF-8")))
}

fn check_string(s: &str, what: &str) -> Result<()> {
    if s.len() > MAX_STRING {
        return Err(Error::InvalidArgument(format!(
            "{what} is longer than {MAX_STRING} bytes"
        )));
    }
    if s.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{what} contains a NUL byte"
        )));
    }
    Ok(())
}

impl Negotiation {
    /// Do the initial handshake on an open stream: read the server's
    /// greeting, send our flags, and ask for structured replies if
    /// `opts` says so. Stops before choosing an export.
    pub async fn start(stream: Stream, opts: &ConnectOptions) -> Result<Negotiation> {
        let mut r = BufReader::with_capacity(READ_BUFFER, stream.reader);
        let mut w = stream.writer;
        let mut b = [0u8; 8];
        read_exact(&mut r, &mut b, "read greeting").await?;
        let magic = be64(&b);
        if magic != NBDMAGIC {
            return Err(Error::Protocol(format!(
                "not an NBD server: bad greeting magic {magic:#018x}"
            )));
        }
        read_exact(&mut r, &mut b, "read greeting").await?;
        let mut n = Negotiation {
            io: None,
            socket: stream.socket,
            opts: opts.clone(),
            style: Style::FixedNewstyle,
            no_zeroes: false,
            structured: false,
            extended: false,
            oldstyle: None,
            transport: None,
            uri: None,
            tls: false,
            keepalive: Vec::new(),
        };
        if let Some(t) = stream.tunnel {
            n.keepalive.push(t);
        }
        match be64(&b) {
            IHAVEOPT => {
                let mut f = [0u8; 2];
                read_exact(&mut r, &mut f, "read handshake flags").await?;
                let gflags = be16(&f);
                let fixed = gflags & p::FLAG_FIXED_NEWSTYLE != 0;
                n.no_zeroes = gflags & p::FLAG_NO_ZEROES != 0;
                n.style = if fixed {
                    Style::FixedNewstyle
                } else {
                    Style::Newstyle
                };
                let mut cflags = 0;
                if fixed {
                    cflags |= p::FLAG_C_FIXED_NEWSTYLE;
                }
                if n.no_zeroes {
                    cflags |= p::FLAG_C_NO_ZEROES;
                }
                w.write_all(&cflags.to_be_bytes())
                    .await
                    .map_err(|e| Error::io("handshake: send client flags", e))?;
                w.flush()
                    .await
                    .map_err(|e| Error::io("handshake: send client flags", e))?;
                n.io = Some((r, w));
                match opts.tls.wanted() {
                    Some((o, required)) if fixed => {
                        let r = n.start_tls(o, required).await;
                        n.poison_on(r)?;
                    }
                    Some((_, true)) => {
                        return Err(Error::Tls(
                            "the server cannot do TLS (its handshake is not fixed newstyle)".into(),
                        ))
                    }
                    _ => {}
                }
                if fixed && opts.structured_replies && opts.extended_headers {
                    // Extended headers first (libnbd 1.18's order); a
                    // server without them gets structured replies asked.
                    let r = n.ask_extended_headers().await;
                    n.extended = n.poison_on(r)?;
                    n.structured = n.extended;
                }
                if fixed && opts.structured_replies && !n.extended {
                    let r = n.structured_reply().await;
                    n.structured = n.poison_on(r)?;
                }
            }
            OLDSTYLE_MAGIC => {
                let mut h = [0u8; 8 + 4 + 124];
                read_exact(&mut r, &mut h, "read oldstyle handshake").await?;
                let size = be64(&h[0..8]);
                // 16 bits of global flags, then 16 of transmission flags.
                let flags = be32(&h[8..12]) as u16;
                check_size(size)?;
                if matches!(opts.tls, TlsPolicy::Require(_)) {
                    return Err(Error::Tls(
                        "the server cannot do TLS (oldstyle handshake)".into(),
                    ));
                }
                n.style = Style::Oldstyle;
                n.oldstyle = Some((size, flags));
                n.io = Some((r, w));
            }
            m => {
                return Err(Error::Protocol(format!(
                    "not an NBD server: unknown handshake magic {m:#018x}"
                )))
            }
        }
        Ok(n)
    }

    /// Connect to `transport` and [`start`](Self::start).
    pub async fn connect(transport: &Transport, opts: &ConnectOptions) -> Result<Negotiation> {
        let mut n = Self::open(transport, opts).await?;
        n.transport = Some(transport.clone());
        Ok(n)
    }

    /// Connect and start; an ssh tunnel that died is named in the error.
    pub(crate) async fn open(transport: &Transport, opts: &ConnectOptions) -> Result<Negotiation> {
        let s = Stream::connect(transport).await?;
        let tunnel = s.tunnel.clone();
        match Negotiation::start(s, opts).await {
            Ok(n) => Ok(n),
            Err(e) => match tunnel {
                Some(t) => Err(t.annotate(e).await),
                None => Err(e),
            },
        }
    }

    /// Connect to an NBD URI and [`start`](Self::start). The URI's
    /// export name replaces the one in `opts`.
    pub async fn connect_uri(uri: &str, opts: &ConnectOptions) -> Result<Negotiation> {
        Uri::parse(uri)?.negotiate(opts).await
    }

    /// The options in use ([`go`](Self::go) uses their export name and
    /// meta contexts).
    pub fn options(&self) -> &ConnectOptions {
        &self.opts
    }

    /// Change the options before [`go`](Self::go) or [`info`](Self::info).
    /// (Asking for structured replies again has no effect: that was
    /// decided by [`start`](Self::start).)
    pub fn options_mut(&mut self) -> &mut ConnectOptions {
        &mut self.opts
    }

    /// Choose the export [`go`](Self::go) will open.
    pub fn set_export_name(&mut self, name: impl Into<String>) {
        self.opts.export_name = name.into();
    }

    /// `newstyle-fixed`, `newstyle` or `oldstyle`.
    pub fn protocol(&self) -> &'static str {
        self.style.as_str()
    }

    /// Were structured replies negotiated? (Also true with extended
    /// headers.)
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Were extended headers negotiated?
    pub fn extended_headers(&self) -> bool {
        self.extended
    }

    /// Is TLS in use?
    pub fn tls(&self) -> bool {
        self.tls
    }

    pub(crate) fn set_uri(&mut self, uri: Uri) {
        self.transport = Some(uri.transport.clone());
        self.uri = Some(uri);
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake: the connection goes on
    /// over TLS. A refusal is an error when TLS is `required`, else the
    /// connection goes on in plaintext.
    async fn start_tls(&mut self, o: &ClientTlsOptions, required: bool) -> Result<()> {
        // Credentials first: a bad file is our error, not the server's.
        let creds = ClientTls::new(o).map_err(|e| Error::Tls(e.0))?;
        self.send_option(opt::STARTTLS, &[]).await?;
        match self.recv_reply(opt::STARTTLS).await {
            Ok((rep::ACK, _)) => {}
            Ok((r, _)) => return Err(Self::unexpected(opt::STARTTLS, r)),
            Err(Error::OptionRefused { .. }) if !required => return Ok(()),
            Err(Error::OptionRefused { reply, message, .. }) => {
                return Err(Error::Tls(format!(
                    "the server refused TLS (NBD_OPT_STARTTLS: {}{})",
                    super::error::rep_name(reply),
                    if message.is_empty() {
                        String::new()
                    } else {
                        format!(": {message}")
                    }
                )))
            }
            Err(e) => return Err(e),
        }
        let (r, w) = self.io.take().ok_or(Error::Closed)?;
        if !r.buffer().is_empty() {
            return Err(Error::Protocol(
                "the server sent data between acknowledging STARTTLS and the TLS handshake".into(),
            ));
        }
        let io: BoxIo = Box::new(Joined {
            reader: r.into_inner(),
            writer: w,
        });
        let s = creds
            .connect(io)
            .await
            .map_err(|e| Error::Tls(format!("handshake failed: {e}")))?;
        let (r, w) = tokio::io::split(s);
        self.io = Some((
            BufReader::with_capacity(READ_BUFFER, Box::new(r)),
            Box::new(w),
        ));
        self.tls = true;
        Ok(())
    }

    /// Where we connected, if known (not for streams and captive servers).
    pub fn transport(&self) -> Option<&Transport> {
        self.transport.as_ref()
    }

    /// The URI of an export on this server, as `nbdinfo` prints it
    /// (`None` when the transport is not known).
    pub fn uri_for(&self, export_name: &str) -> Option<String> {
        uri_for(self.uri.as_ref(), self.transport.as_ref(), export_name)
    }

    /// Keep `obj` alive as long as this negotiation, and then the
    /// connection [`go`](Self::go) returns.
    pub fn keep_alive(&mut self, obj: Arc<dyn Any + Send + Sync>) {
        self.keepalive.push(obj);
    }

    /// After an operation: anything but a refused option leaves the
    /// connection unusable.
    fn poison_on<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if !matches!(e, Error::OptionRefused { .. }) {
                self.io = None;
            }
        }
        r
    }

    fn io(&mut self) -> Result<&mut (BufReader<BoxRead>, BoxWrite)> {
        self.io.as_mut().ok_or(Error::Closed)
    }

    fn need_fixed(&self, what: u32) -> Result<()> {
        if self.style != Style::FixedNewstyle {
            return Err(Error::Unsupported(format!(
                "{}: the server does not support options ({} handshake)",
                opt::name(what),
                self.style.as_str()
            )));
        }
        Ok(())
    }

    async fn send_option(&mut self, option: u32, payload: &[u8]) -> Result<()> {
        let (_, w) = self.io()?;
        let ctx = || format!("handshake: send {}", opt::name(option));
        w.write_all(&p::option_header(option, payload.len() as u32))
            .await
            .map_err(|e| Error::io(ctx(), e))?;
        w.write_all(payload)
            .await
            .map_err(|e| Error::io(ctx(), e))?;
        w.flush().await.map_err(|e| Error::io(ctx(), e))
    }

    /// Read one option reply. Error replies become
    /// [`Error::OptionRefused`].
    async fn recv_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>)> {
        let (r, _) = self.io()?;
        let what = format!("read reply to {}", opt::name(option));
        let mut h = [0u8; 20];
        read_exact(r, &mut h, &what).await?;
        let reply = OptionReply::decode(&h)
            .ok_or_else(|| Error::Protocol(format!("bad option reply magic in {what}")))?;
        if reply.option != option {
            return Err(Error::Protocol(format!(
                "server replied to {} when we sent {}",
                opt::name(reply.option),
                opt::name(option)
            )));
        }
        if reply.len > MAX_OPTION_LEN {
            return Err(Error::Protocol(format!(
                "option reply of {} bytes is too large",
                reply.len
            )));
        }
        let mut payload = vec![0u8; reply.len as usize];
        read_exact(r, &mut payload, &what).await?;
        if reply.reply & rep::ERR != 0 {
            return Err(Error::OptionRefused {
                option,
                reply: reply.reply,
                message: String::from_utf8_lossy(&payload).into_owned(),
            });
        }
        Ok((reply.reply, payload))
    }

    fn unexpected(option: u32, reply: u32) -> Error {
        Error::Protocol(format!(
            "unexpected reply {} to {}",
            super::error::rep_name(reply),
            opt::name(option)
        ))
    }

    async fn structured_reply(&mut self) -> Result<bool> {
        self.send_option(opt::STRUCTURED_REPLY, &[]).await?;
        match self.recv_reply(opt::STRUCTURED_REPLY).await {
            Ok((rep::ACK, _)) => Ok(true),
            Ok((r, _)) => Err(Self::unexpected(opt::STRUCTURED_REPLY, r)),
            Err(Error::OptionRefused { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn ask_extended_headers(&mut self) -> Result<bool> {
        self.send_option(opt::EXTENDED_HEADERS, &[]).await?;
        match self.recv_reply(opt::EXTENDED_HEADERS).await {
            Ok((rep::ACK, _)) => Ok(true),
            Ok((r, _)) => Err(Self::unexpected(opt::EXTENDED_HEADERS, r)),
            Err(Error::OptionRefused { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `NBD_OPT_LIST`: the server's exports.
    pub async fn list_exports(&mut self) -> Result<Vec<ExportEntry>> {
        self.need_fixed(opt::LIST)?;
        let r = self.do_list().await;
        self.poison_on(r)
    }

    async fn do_list(&mut self) -> Result<Vec<ExportEntry>> {
        {
            self.send_option(opt::LIST, &[]).await?;
            let mut out = Vec::new();
            let mut budget = ListBudget::default();
            loop {
                let (reply, payload) = self.recv_reply(opt::LIST).await?;
                budget.take(payload.len(), "NBD_OPT_LIST")?;
                match reply {
                    rep::SERVER => {
                        let mut rd = p::Reader::new(&payload);
                        let len = rd.u32().ok_or_else(|| {
                            Error::Protocol("NBD_REP_SERVER reply is too short".into())
                        })? as usize;
                        let name = rd.bytes(len).ok_or_else(|| {
                            Error::Protocol("NBD_REP_SERVER name is longer than the reply".into())
                        })?;
                        let name = utf8(name, "export name")?;
                        let desc = String::from_utf8_lossy(rd.rest()).into_owned();
                        out.push(ExportEntry {
                            name,
                            description: (!desc.is_empty()).then_some(desc),
                        });
                    }
                    rep::ACK => return Ok(out),
                    r => return Err(Self::unexpected(opt::LIST, r)),
                }
            }
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT`: the meta contexts of export `name`
    /// that match `queries` (all of them when `queries` is empty).
    pub async fn list_meta_contexts(
        &mut self,
        name: &str,
        queries: &[&str],
    ) -> Result<Vec<String>> {
        self.need_fixed(opt::LIST_META_CONTEXT)?;
        if !self.structured {
            return Err(Error::Unsupported(
                "NBD_OPT_LIST_META_CONTEXT: structured replies were not negotiated".into(),
            ));
        }
        let payload = meta_payload(name, queries.iter().copied())?;
        let r = self.do_list_meta(payload).await;
        self.poison_on(r)
    }

    async fn do_list_meta(&mut self, payload: Vec<u8>) -> Result<Vec<String>> {
        {
            self.send_option(opt::LIST_META_CONTEXT, &payload).await?;
            let mut out = Vec::new();
            let mut budget = ListBudget::default();
            loop {
                let (reply, payload) = self.recv_reply(opt::LIST_META_CONTEXT).await?;
                budget.take(payload.len(), "NBD_OPT_LIST_META_CONTEXT")?;
                match reply {
                    rep::META_CONTEXT => out.push(parse_meta_context(&payload)?.name),
                    rep::ACK => return Ok(out),
                    r => return Err(Self::unexpected(opt::LIST_META_CONTEXT, r)),
                }
            }
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `name` with the requested contexts.
    /// A refusal means no contexts.
    async fn set_meta_context(&mut self, name: &str) -> Result<Vec<MetaContext>> {
        if !self.structured || self.opts.meta_contexts.is_empty() {
            return Ok(Vec::new());
        }
        let payload = meta_payload(name, self.opts.meta_contexts.iter().map(String::as_str))?;
        self.send_option(opt::SET_META_CONTEXT, &payload).await?;
        let mut out: Vec<MetaContext> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        loop {
            let (reply, payload) = match self.recv_reply(opt::SET_META_CONTEXT).await {
                Ok(r) => r,
                Err(Error::OptionRefused { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            match reply {
                rep::META_CONTEXT => {
                    let c = parse_meta_context(&payload)?;
                    // The server may select only what we asked for, each
                    // once: anything else is a broken or hostile server
                    // (and would otherwise let it grow the list at will).
                    let asked = self
                        .opts
                        .meta_contexts
                        .iter()
                        .any(|q| crate::backend::meta_context_matches(&c.name, q, true));
                    if !asked {
                        return Err(Error::Protocol(format!(
                            "server selected meta context {:?}, which we did not ask for",
                            c.name
                        )));
                    }
                    if !ids.insert(c.id) || !names.insert(c.name.clone()) {
                        return Err(Error::Protocol(format!(
                            "meta context {:?} (id {}) selected twice",
                            c.name, c.id
                        )));
                    }
                    if out.len() >= MAX_META_CONTEXTS {
                        return Err(Error::Protocol(format!(
                            "server selected more than {MAX_META_CONTEXTS} meta contexts"
                        )));
                    }
                    out.push(c);
                }
                rep::ACK => return Ok(out),
                r => return Err(Self::unexpected(opt::SET_META_CONTEXT, r)),
            }
        }
    }

    /// `NBD_OPT_INFO` (or `NBD_OPT_GO`) for `name`, after selecting meta
    /// contexts for it.
    async fn info_or_go(&mut self, option: u32, name: &str) -> Result<ExportInfo> {
        check_string(name, "export name")?;
        let meta_contexts = self.set_meta_context(name).await?;
        let mut req = Vec::with_capacity(name.len() + 12);
        p::put_string32(&mut req, name);
        let mut infos = Vec::new();
        if self.opts.full_info {
            infos.extend([info::NAME, info::DESCRIPTION]);
        }
        if self.opts.block_size {
            infos.push(info::BLOCK_SIZE);
        }
        req.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            req.extend_from_slice(&i.to_be_bytes());
        }
        self.send_option(option, &req).await?;
        let mut export = None;
        let mut out = ExportInfo {
            export_name: name.to_string(),
            canonical_name: None,
            description: None,
            size: 0,
            flags: TransmissionFlags(0),
            block_size: None,
            meta_contexts,
            structured_replies: self.structured,
            extended_headers: self.extended,
        };
        loop {
            let (reply, payload) = self.recv_reply(option).await?;
            match reply {
                rep::INFO => {
                    if payload.len() < 2 {
                        return Err(Error::Protocol("NBD_REP_INFO reply is too short".into()));
                    }
                    let body = &payload[2..];
                    match be16(&payload) {
                        info::EXPORT => {
                            if body.len() != 10 {
                                return Err(Error::Protocol(format!(
                                    "NBD_INFO_EXPORT of {} bytes, expected 12",
                                    payload.len()
                                )));
                            }
                            export = Some((be64(&body[0..8]), be16(&body[8..10])));
                        }
                        info::NAME => out.canonical_name = Some(utf8(body, "export name")?),
                        info::DESCRIPTION => {
                            out.description = Some(utf8(body, "export description")?)
                        }
                        info::BLOCK_SIZE => {
                            if body.len() != 12 {
                                return Err(Error::Protocol(format!(
                                    "NBD_INFO_BLOCK_SIZE of {} bytes, expected 14",
                                    payload.len()
                                )));
                            }
                            let bs = BlockSizes {
                                minimum: be32(&body[0..4]),
                                preferred: be32(&body[4..8]),
                                maximum: be32(&body[8..12]),
                            };
                            bs.validate().map_err(Error::Protocol)?;
                            out.block_size = Some(bs);
                        }
                        _ => {} // the client must ignore unknown information
                    }
                }
                rep::ACK => break,
                r => return Err(Self::unexpected(option, r)),
            }
        }
        let (size, flags) = export.ok_or_else(|| {
            Error::Protocol(format!(
                "{}: server did not send NBD_INFO_EXPORT",
                opt::name(option)
            ))
        })?;
        check_size(size)?;
        out.size = size;
        out.flags = TransmissionFlags(flags);
        Ok(out)
    }

    /// `NBD_OPT_INFO`: what the server says about export `name`
    /// (including the meta contexts it would select for it), staying in
    /// negotiation.
    pub async fn info(&mut self, name: &str) -> Result<ExportInfo> {
        self.need_fixed(opt::INFO)?;
        let r = self.info_or_go(opt::INFO, name).await;
        self.poison_on(r)
    }

    async fn export_name(&mut self, name: &str) -> Result<ExportInfo> {
        check_string(name, "export name")?;
        self.send_option(opt::EXPORT_NAME, name.as_bytes()).await?;
        let no_zeroes = self.no_zeroes;
        let (r, _) = self.io()?;
        let mut b = [0u8; 10 + 124];
        let len = if no_zeroes { 10 } else { 10 + 124 };
        r.read_exact(&mut b[..len]).await.map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::io(
                    "handshake: NBD_OPT_EXPORT_NAME",
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "server closed the connection (is there an export named {name:?}?)"
                        ),
                    ),
                )
            } else {
                Error::io("handshake: NBD_OPT_EXPORT_NAME", e)
            }
        })?;
        let size = be64(&b[0..8]);
        check_size(size)?;
        // Meta contexts selected before EXPORT_NAME stay selected.
        Ok(ExportInfo {
            export_name: name.to_string(),
            canonical_name: None,
            description: None,
            size,
            flags: TransmissionFlags(be16(&b[8..10])),
            block_size: None,
            meta_contexts: Vec::new(),
            structured_replies: self.structured,
            extended_headers: false,
        })
    }

    async fn do_go(&mut self) -> Result<ExportInfo> {
        let name = self.opts.export_name.clone();
        match self.style {
            Style::Oldstyle => {
                let (size, flags) = self.oldstyle.unwrap_or_default();
                Ok(ExportInfo {
                    export_name: name,
                    canonical_name: None,
                    description: None,
                    size,
                    flags: TransmissionFlags(flags),
                    block_size: None,
                    meta_contexts: Vec::new(),
                    structured_replies: false,
                    extended_headers: false,
                })
            }
            Style::Newstyle => self.export_name(&name).await,
            Style::FixedNewstyle => match self.info_or_go(opt::GO, &name).await {
                // With extended headers EXPORT_NAME is forbidden (and a
                // server that acknowledged them must know GO).
                Err(Error::OptionRefused {
                    reply: rep::ERR_UNSUP,
                    ..
                }) if !self.extended => {
                    // An old server: fall back, keeping the contexts.
                    let contexts = self.set_meta_context(&name).await?;
                    let mut i = self.export_name(&name).await?;
                    i.meta_contexts = contexts;
                    Ok(i)
                }
                r => r,
            },
        }
    }

    /// Open the export named in the options (`NBD_OPT_GO`, falling back
    /// to `NBD_OPT_EXPORT_NAME` for servers that do not know GO) and
    /// enter transmission. If the server refuses
    /// ([`Error::OptionRefused`]) the negotiation can go on, for example
    /// with another export name.
    pub async fn go(&mut self) -> Result<Connection> {
        self.io()?;
        let r = self.do_go().await;
        let info = self.poison_on(r)?;
        let (r, w) = self.io.take().ok_or(Error::Closed)?;
        Ok(Connection::start(
            r,
            w,
            info,
            Handover {
                protocol: self.style.as_str(),
                tls: self.tls,
                uri: self.uri.clone(),
                transport: self.transport.clone(),
                socket: self.socket.take(),
                keepalive: std::mem::take(&mut self.keepalive),
            },
        ))
    }

    /// End the negotiation politely (`NBD_OPT_ABORT`) and close.
    pub async fn abort(mut self) -> Result<()> {
        if self.io.is_none() {
            return Ok(());
        }
        if self.style == Style::FixedNewstyle && self.send_option(opt::ABORT, &[]).await.is_ok() {
            // The server should ACK, but may just close.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.recv_reply(opt::ABORT)).await;
        }
        if let Some((_, mut w)) = self.io.take() {
            let _ = w.shutdown().await;
        }
        Ok(())
    }
}

/// The URI of `export_name` on the server we reached by `uri` (keeping
/// its TLS parameters, as `nbd_get_uri` does) or by `transport`.
pub(crate) fn uri_for(
    uri: Option<&Uri>,
    transport: Option<&Transport>,
    export_name: &str,
) -> Option<String> {
    match uri {
        Some(u) => {
            let mut u = u.clone();
            u.export_name = export_name.to_string();
            // Verifying is the default: libnbd leaves it out.
            if u.tls_verify_peer == Some(true) {
                u.tls_verify_peer = None;
            }
            Some(u.to_string())
        }
        None => transport.map(|t| Uri::new(t.clone(), export_name).to_string()),
    }
}

fn check_size(size: u64) -> Result<()> {
    if size > i64::MAX as u64 {
        return Err(Error::Protocol(format!("export size {size} is too large")));
    }
    Ok(())
}

fn meta_payload<'a>(name: &str, queries: impl Iterator<Item = &'a str>) -> Result<Vec<u8>> {
    check_string(name, "export name")?;
    let mut out = Vec::new();
    p::put_string32(&mut out, name);
    let count_at = out.len();
    out.extend_from_slice(&0u32.to_be_bytes());
    let mut n = 0u32;
    for q in queries {
        check_string(q, "meta context")?;
        p::put_string32(&mut out, q);
        n += 1;
    }
    out[count_at..count_at + 4].copy_from_slice(&n.to_be_bytes());
    if out.len() > MAX_OPTION_LEN as usize {
        return Err(Error::InvalidArgument(
            "too many meta contexts requested".into(),
        ));
    }
    Ok(out)
}

fn parse_meta_context(payload: &[u8]) -> Result<MetaContext> {
    if payload.len() < 4 {
        return Err(Error::Protocol(
            "NBD_REP_META_CONTEXT reply is too short".into(),
        ));
    }
    Ok(MetaContext {
        id: be32(payload),
        name: utf8(&payload[4..], "meta context name")?,
    })
}
