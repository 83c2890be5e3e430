//! The handshake phase: the server's greeting, the client's flags, and
//! option haggling until the client picks an export (`NBD_OPT_GO`,
//! `NBD_OPT_EXPORT_NAME`) or leaves; opening the export and working out
//! its transmission flags.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Close, Negotiated, ServerConfig, Writer};
use crate::backend::{Cache, Disconnect, Error, Fua, Handle, OpenContext, ThreadModel};
use crate::protocol::{self as p, errno, info, opt, rep, tflags};
use crate::tls::ServerTls;

/// Per-connection option state.
pub(super) struct OptState {
    /// Structured replies, or extended headers (which imply them).
    structured: bool,
    /// Extended headers (`NBD_OPT_EXTENDED_HEADERS`).
    extended: bool,
    no_zeroes: bool,
    /// Context id of `base:allocation` if the client selected it.
    base_allocation: Option<u32>,
    /// The plugin's other meta contexts the client selected, with the
    /// ids we gave them.
    contexts: Vec<(u32, String)>,
    /// TLS is running.
    pub(super) tls: bool,
    /// Options received so far (before and after TLS).
    count: u32,
    /// The name the empty export name stands for, asked once per
    /// connection (as nbdkit), when first needed.
    default_export: Option<String>,
}

impl OptState {
    /// TLS started: what was negotiated in plaintext is forgotten, as
    /// the spec says (the client negotiates it again over TLS).
    pub(super) fn tls_started(&mut self) {
        self.tls = true;
        self.structured = false;
        self.extended = false;
        self.base_allocation = None;
        self.contexts.clear();
    }
}

/// Context id we give `base:allocation`.
pub(super) const BASE_ALLOCATION_ID: u32 = 1;

async fn send_reply<W: AsyncWrite + Unpin>(
    w: &Writer<W>,
    option: u32,
    reply: u32,
    payload: &[u8],
) -> Result<(), Close> {
    let mut w = w.lock().await;
    w.write_all(&p::option_reply_header(option, reply, payload.len() as u32))
        .await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

async fn send_error<W: AsyncWrite + Unpin>(
    cfg: &ServerConfig,
    w: &Writer<W>,
    option: u32,
    reply: u32,
    msg: &str,
) -> Result<(), Close> {
    cfg.server
        .debug(format_args!("{}: {msg}", opt::name(option)));
    send_reply(w, option, reply, msg.as_bytes()).await
}

/// What option haggling ended with.
pub(super) enum Outcome {
    /// The client chose an export: on to transmission.
    Go(Negotiated),
    /// `NBD_OPT_STARTTLS` was acknowledged: run the TLS handshake with
    /// these credentials, then haggle on over TLS.
    StartTls(Arc<ServerTls>),
}

/// Greet the client and read its flags; the options' starting state.
pub(super) async fn greet<R, W>(r: &mut R, w: &Writer<W>) -> Result<OptState, Close>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    {
        let mut w = w.lock().await;
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&p::NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&p::IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(p::FLAG_FIXED_NEWSTYLE | p::FLAG_NO_ZEROES).to_be_bytes());
        w.write_all(&hello).await?;
        w.flush().await?;
    }
    let cflags = r.read_u32().await?;
    if cflags & !(p::FLAG_C_FIXED_NEWSTYLE | p::FLAG_C_NO_ZEROES) != 0 {
        return Err(Close::Protocol(format!(
            "client sent unknown handshake flags {cflags:#x}"
        )));
    }
    Ok(OptState {
        structured: false,
        extended: false,
        no_zeroes: cflags & p::FLAG_C_NO_ZEROES != 0,
        base_allocation: None,
        contexts: Vec::new(),
        default_export: None,
        tls: false,
        count: 0,
    })
}

/// Haggle over options until the client chooses an export or starts TLS.
pub(super) async fn options<R, W>(
    cfg: &Arc<ServerConfig>,
    r: &mut R,
    w: &Writer<W>,
    peer: &super::Peer,
    id: u64,
    st: &mut OptState,
) -> Result<Outcome, Close>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        st.count += 1;
        if st.count > 1000 {
            return Err(Close::Protocol("too many options".into()));
        }
        let magic = r.read_u64().await?;
        if magic != p::IHAVEOPT {
            return Err(Close::Protocol(format!(
                "client sent bad option magic {magic:#x}"
            )));
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > p::MAX_OPTION_LEN {
            // Well formed but larger than any real client sends: skipped
            // (never held in memory) and refused, and the negotiation goes
            // on, as upstream; EXPORT_NAME cannot be refused, and past
            // the hard cap the client is only wasting our time.
            if len > p::MAX_REQUEST_SIZE || option == opt::EXPORT_NAME {
                return Err(Close::Protocol(format!(
                    "client sent {} with oversized payload ({len} bytes)",
                    opt::name(option)
                )));
            }
            tokio::io::copy(&mut (&mut *r).take(len as u64), &mut tokio::io::sink()).await?;
            send_error(cfg, w, option, rep::ERR_TOO_BIG, "option payload too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        cfg.server.debug(format_args!(
            "connection {id}: option {} ({len} bytes)",
            opt::name(option)
        ));
        if cfg.tls_required && !st.tls && option != opt::STARTTLS && option != opt::ABORT {
            // FORCEDTLS: nothing about any export before TLS; EXPORT_NAME
            // cannot be refused, so it ends the connection.
            if option == opt::EXPORT_NAME {
                return Err(Close::Protocol(
                    "client sent NBD_OPT_EXPORT_NAME before TLS, which this server requires".into(),
                ));
            }
            send_error(cfg, w, option, rep::ERR_TLS_REQD, "TLS is required").await?;
            continue;
        }
        match option {
            opt::EXPORT_NAME if st.extended => {
                // The spec: a client that negotiated extended headers
                // MUST NOT use EXPORT_NAME, which cannot be refused.
                return Err(Close::Protocol(
                    "client sent NBD_OPT_EXPORT_NAME after negotiating extended headers".into(),
                ));
            }
            opt::EXPORT_NAME => {
                let name = match String::from_utf8(data) {
                    Ok(n) if n.len() <= p::MAX_STRING && !n.contains('\0') => n,
                    _ => return Err(Close::Protocol(
                        "bad export name (longer than 4096 bytes, not UTF-8, or with NUL bytes)"
                            .into(),
                    )),
                };
                let neg = match open_export(cfg, &name, peer, id, &mut *st).await {
                    Ok(n) => n,
                    Err(e) => {
                        return Err(Close::Protocol(format!(
                            "cannot open export '{name}': {}",
                            e.msg
                        )))
                    }
                };
                let mut out = Vec::with_capacity(134);
                out.extend_from_slice(&neg.size.to_be_bytes());
                out.extend_from_slice(&neg.flags.to_be_bytes());
                if !st.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                let mut w = w.lock().await;
                w.write_all(&out).await?;
                w.flush().await?;
                return Ok(Outcome::Go(neg));
            }
            opt::ABORT => {
                // Best effort: the client may already be gone.
                let _ = send_reply(w, option, rep::ACK, &[]).await;
                return Err(Close::Done);
            }
            opt::LIST => {
                if !data.is_empty() {
                    send_error(cfg, w, option, rep::ERR_INVALID, "LIST takes no payload").await?;
                    continue;
                }
                match cfg.stack.top().list_exports(cfg.server.readonly()).await {
                    Ok(list) => {
                        for e in list {
                            let mut pl = Vec::new();
                            p::put_string32(&mut pl, &e.name);
                            if let Some(d) = &e.description {
                                pl.extend_from_slice(d.as_bytes());
                            }
                            send_reply(w, option, rep::SERVER, &pl).await?;
                        }
                        send_reply(w, option, rep::ACK, &[]).await?;
                    }
                    Err(e) => send_error(cfg, w, option, rep::ERR_PLATFORM, &e.msg).await?,
                }
            }
            opt::STARTTLS => match &cfg.tls {
                None => {
                    send_error(
                        cfg,
                        w,
                        option,
                        // As upstream: a policy (the server was started
                        // without TLS), not an unknown option.
                        rep::ERR_POLICY,
                        "TLS is not enabled on this server",
                    )
                    .await?
                }
                Some(_) if !data.is_empty() => {
                    send_error(
                        cfg,
                        w,
                        option,
                        rep::ERR_INVALID,
                        "STARTTLS takes no payload",
                    )
                    .await?
                }
                Some(_) if st.tls => {
                    send_error(cfg, w, option, rep::ERR_INVALID, "TLS is already in use").await?
                }
                Some(tls) => {
                    send_reply(w, option, rep::ACK, &[]).await?;
                    return Ok(Outcome::StartTls(tls.clone()));
                }
            },
            opt::INFO | opt::GO => {
                let mut rd = p::Reader::new(&data);
                let parsed = (|| {
                    let name = rd.string32()?;
                    let n = rd.u16()? as usize;
                    let mut reqs = Vec::with_capacity(n);
                    for _ in 0..n {
                        reqs.push(rd.u16()?);
                    }
                    if rd.remaining() != 0 {
                        return None;
                    }
                    Some((name, reqs))
                })();
                let Some((name, reqs)) = parsed else {
                    send_error(
                        cfg,
                        w,
                        option,
                        rep::ERR_INVALID,
                        "malformed INFO/GO request (or an export name longer than 4096 bytes or not UTF-8)",
                    )
                    .await?;
                    continue;
                };
                if name.contains('\0') {
                    // As upstream: no plugin could be given such a name.
                    send_error(
                        cfg,
                        w,
                        option,
                        rep::ERR_INVALID,
                        "export name may not include NUL bytes",
                    )
                    .await?;
                    continue;
                }
                let neg = match open_export(cfg, &name, peer, id, &mut *st).await {
                    Ok(n) => n,
                    Err(e) => {
                        let code = if e.errno == errno::EPERM {
                            rep::ERR_POLICY
                        } else {
                            rep::ERR_UNKNOWN
                        };
                        send_error(cfg, w, option, code, &format!("{name}: {}", e.msg)).await?;
                        continue;
                    }
                };
                send_info(w, option, &reqs, &neg).await?;
                send_reply(w, option, rep::ACK, &[]).await?;
                if option == opt::GO {
                    return Ok(Outcome::Go(neg));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_error(
                        cfg,
                        w,
                        option,
                        rep::ERR_INVALID,
                        "STRUCTURED_REPLY takes no payload",
                    )
                    .await?;
                } else if !cfg.structured_replies {
                    send_error(
                        cfg,
                        w,
                        option,
                        rep::ERR_UNSUP,
                        "structured replies are disabled",
                    )
                    .await?;
                } else if st.extended {
                    // Extended headers take precedence: no going back.
                    send_error(
                        cfg,
                        w,
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers are already negotiated",
                    )
                    .await?;
                } else {
                    st.structured = true;
                    send_reply(w, option, rep::ACK, &[]).await?;
                }
            }
            opt::EXTENDED_HEADERS => {
                if !data.is_empty() {
                    send_error(
                        cfg,
                        w,
                        option,
                        rep::ERR_INVALID,
                        "EXTENDED_HEADERS takes no payload",
                    )
                    .await?;
                } else if !cfg.extended_headers || !cfg.structured_replies {
                    send_error(
                        cfg,
                        w,
                        option,
                        rep::ERR_UNSUP,
                        "extended headers are disabled",
                    )
                    .await?;
                } else {
                    st.extended = true;
                    st.structured = true;
                    cfg.server
                        .debug(format_args!("connection {id}: extended headers negotiated"));
                    send_reply(w, option, rep::ACK, &[]).await?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(cfg, w, option, &data, st).await?;
            }
            _ => {
                send_error(
                    cfg,
                    w,
                    option,
                    rep::ERR_UNSUP,
                    &format!("option {option} ({}) not supported", opt::name(option)),
                )
                .await?
            }
        }
    }
}

async fn meta_context<W: AsyncWrite + Unpin>(
    cfg: &Arc<ServerConfig>,
    w: &Writer<W>,
    option: u32,
    data: &[u8],
    st: &mut OptState,
) -> Result<(), Close> {
    if !cfg.meta_contexts {
        return send_error(cfg, w, option, rep::ERR_UNSUP, "meta contexts are disabled").await;
    }
    // LIST needs no structured replies (the spec lets a server refuse it
    // there; upstream answers it, and so do we); SET does.
    if !st.structured && option == opt::SET_META_CONTEXT {
        return send_error(
            cfg,
            w,
            option,
            rep::ERR_INVALID,
            "meta contexts need structured replies or extended headers first",
        )
        .await;
    }
    let mut rd = p::Reader::new(data);
    let parsed = (|| {
        let export = rd.string32()?;
        let n = rd.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(rd.string32()?);
        }
        if rd.remaining() != 0 {
            return None;
        }
        Some((export, queries))
    })();
    let Some(parsed) = parsed else {
        return send_error(
            cfg,
            w,
            option,
            rep::ERR_INVALID,
            "malformed meta context request",
        )
        .await;
    };
    let (export, queries) = parsed;
    let set = option == opt::SET_META_CONTEXT;
    let wanted = if set {
        queries.iter().any(|q| q == p::CONTEXT_BASE_ALLOCATION)
    } else {
        queries.is_empty()
            || queries
                .iter()
                .any(|q| q == "base:" || q == p::CONTEXT_BASE_ALLOCATION)
    };
    // The plugin's own contexts (queries outside `base:`; none asked
    // for is all of them when listing, nothing when setting).
    let others: Vec<String> = queries
        .iter()
        .filter(|q| !q.starts_with("base:"))
        .cloned()
        .collect();
    let extra = if others.is_empty() && (set || !queries.is_empty()) {
        Vec::new()
    } else {
        let export = if export.is_empty() {
            st.default_export
                .get_or_insert_with(|| cfg.stack.top().default_export())
                .clone()
        } else {
            export
        };
        match cfg.stack.meta_contexts(&export, &others, !set).await {
            Ok(names) => names
                .into_iter()
                .filter(|n| n != p::CONTEXT_BASE_ALLOCATION && n.len() <= p::MAX_STRING)
                .collect(),
            Err(e) => {
                cfg.server
                    .debug(format_args!("{}: {}", opt::name(option), e.msg));
                Vec::new()
            }
        }
    };
    let extra: Vec<(u32, String)> = extra
        .into_iter()
        .enumerate()
        .map(|(i, n)| (BASE_ALLOCATION_ID + 1 + i as u32, n))
        .collect();
    if set {
        st.base_allocation = wanted.then_some(BASE_ALLOCATION_ID);
        st.contexts = extra.clone();
    }
    let mut replies: Vec<(u32, &str)> = Vec::new();
    if wanted {
        replies.push((BASE_ALLOCATION_ID, p::CONTEXT_BASE_ALLOCATION));
    }
    replies.extend(extra.iter().map(|(id, n)| (*id, n.as_str())));
    for (id, name) in replies {
        let mut pl = Vec::with_capacity(4 + name.len());
        pl.extend_from_slice(&id.to_be_bytes());
        pl.extend_from_slice(name.as_bytes());
        send_reply(w, option, rep::META_CONTEXT, &pl).await?;
    }
    send_reply(w, option, rep::ACK, &[]).await
}

async fn send_info<W: AsyncWrite + Unpin>(
    w: &Writer<W>,
    option: u32,
    reqs: &[u16],
    neg: &Negotiated,
) -> Result<(), Close> {
    send_reply(w, option, rep::INFO, &p::info_export(neg.size, neg.flags)).await?;
    if reqs.contains(&info::NAME) {
        let name = p::info_string(info::NAME, &neg.export_name);
        send_reply(w, option, rep::INFO, &name).await?;
    }
    if reqs.contains(&info::DESCRIPTION) {
        if let Some(d) = neg.handle.export_description() {
            send_reply(w, option, rep::INFO, &p::info_string(info::DESCRIPTION, &d)).await?;
        }
    }
    if let Ok(Some(bs)) = neg.handle.block_size() {
        send_reply(
            w,
            option,
            rep::INFO,
            &p::info_block_size(bs.minimum, bs.preferred, bs.maximum),
        )
        .await?;
    }
    Ok(())
}

/// Open the stack for an export and compute the transmission flags.
async fn open_export(
    cfg: &Arc<ServerConfig>,
    name: &str,
    peer: &super::Peer,
    id: u64,
    st: &mut OptState,
) -> Result<Negotiated, Error> {
    let export_name = if name.is_empty() {
        st.default_export
            .get_or_insert_with(|| cfg.stack.top().default_export())
            .clone()
    } else {
        name.to_string()
    };
    let ctx = OpenContext {
        readonly: cfg.server.readonly(),
        export_name,
        default_export: name.is_empty(),
        peer: peer.addr,
        cred: peer.cred.clone(),
        tls: st.tls,
        id,
        disconnect: Disconnect::default(),
        meta_contexts: st.contexts.iter().map(|(_, n)| n.clone()).collect(),
    };
    let h: Arc<dyn Handle> = Arc::from(cfg.stack.open(&ctx).await?);
    let size = h.size()?;
    let caps = h.caps()?;
    let write = !cfg.server.readonly() && caps.write;
    let mut flags = tflags::HAS_FLAGS;
    for (on, flag) in [
        // The spec: MUST NOT set SEND_DF unless structured replies were
        // negotiated (DF asks for one data chunk).
        (st.structured, tflags::SEND_DF),
        (!write, tflags::READ_ONLY),
        (caps.flush, tflags::SEND_FLUSH),
        (write && caps.fua != Fua::None, tflags::SEND_FUA),
        (caps.rotational, tflags::ROTATIONAL),
        (write && caps.trim, tflags::SEND_TRIM),
        (write && caps.zero, tflags::SEND_WRITE_ZEROES),
        (write && caps.zero && caps.fast_zero, tflags::SEND_FAST_ZERO),
        // One client at a time cannot share anything (as nbdkit).
        (
            caps.multi_conn && cfg.stack.thread_model() > ThreadModel::SerializeConnections,
            tflags::CAN_MULTI_CONN,
        ),
        (caps.cache != Cache::None, tflags::SEND_CACHE),
        // A block status may name the contexts it wants (extended
        // headers, and contexts to choose from).
        (
            st.extended && (st.base_allocation.is_some() || !st.contexts.is_empty()),
            tflags::BLOCK_STATUS_PAYLOAD,
        ),
    ] {
        if on {
            flags |= flag;
        }
    }
    Ok(Negotiated {
        handle: h,
        flags,
        size,
        structured: st.structured,
        extended: st.extended,
        base_allocation: st.base_allocation,
        contexts: st.contexts.clone(),
        export_name: ctx.export_name,
        disconnect: ctx.disconnect,
    })
}
