//! Plain data: connection options, what the server told us about an
//! export, block status results.

use crate::protocol::{tflags, CONTEXT_BASE_ALLOCATION};
pub use crate::tls::ClientTlsOptions;

/// What to ask the server for when connecting.
///
/// `ConnectOptions::default()` asks for the default export (`""`),
/// structured replies, the `base:allocation` meta context, and every
/// piece of export information (name, description, block size).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// The export to open. A URI passed to a `connect_uri` function
    /// overrides it with the URI's export name.
    pub export_name: String,
    /// Meta contexts to select with `NBD_OPT_SET_META_CONTEXT`
    /// (`base:allocation`, `qemu:dirty-bitmap:NAME`,
    /// `qemu:allocation-depth`, ...). Empty: none.
    pub meta_contexts: Vec<String>,
    /// Ask for structured replies (needed for block status and for
    /// sparse reads).
    pub structured_replies: bool,
    /// Ask for extended headers first (64-bit requests: zero, trim and
    /// block status of any size in one request), falling back to
    /// structured replies (as libnbd 1.18's
    /// `nbd_set_request_extended_headers`, on by default).
    pub extended_headers: bool,
    /// Ask for `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION`.
    pub full_info: bool,
    /// Ask for `NBD_INFO_BLOCK_SIZE` (and then obey it).
    pub block_size: bool,
    /// Whether to start TLS, and with what (libnbd's `nbd_set_tls`;
    /// `nbds://` URIs require it).
    pub tls: TlsPolicy,
}

/// Whether a client starts TLS (libnbd's `LIBNBD_TLS_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Never (plain `nbd://`).
    #[default]
    Disable,
    /// When the server offers it, else go on in plaintext.
    Allow(ClientTlsOptions),
    /// Always: fail if the server will not (`nbds://`).
    Require(ClientTlsOptions),
}

impl TlsPolicy {
    /// The TLS options and whether TLS is required, unless disabled.
    pub fn wanted(&self) -> Option<(&ClientTlsOptions, bool)> {
        match self {
            TlsPolicy::Disable => None,
            TlsPolicy::Allow(o) => Some((o, false)),
            TlsPolicy::Require(o) => Some((o, true)),
        }
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            export_name: String::new(),
            meta_contexts: vec![CONTEXT_BASE_ALLOCATION.to_string()],
            structured_replies: true,
            extended_headers: true,
            full_info: true,
            block_size: true,
            tls: TlsPolicy::Disable,
        }
    }
}

impl ConnectOptions {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }
    /// Set the export name.
    pub fn export_name(mut self, name: impl Into<String>) -> Self {
        self.export_name = name.into();
        self
    }
    /// Add a meta context to request.
    pub fn meta_context(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        if !self.meta_contexts.contains(&name) {
            self.meta_contexts.push(name);
        }
        self
    }
    /// Replace the meta contexts to request (empty: none).
    pub fn meta_contexts<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.meta_contexts = names.into_iter().map(Into::into).collect();
        self
    }
    /// Ask for structured replies or not.
    pub fn structured_replies(mut self, on: bool) -> Self {
        self.structured_replies = on;
        self
    }
    /// Ask for extended headers or not.
    pub fn extended_headers(mut self, on: bool) -> Self {
        self.extended_headers = on;
        self
    }
    /// Ask for the export's canonical name and description or not.
    pub fn full_info(mut self, on: bool) -> Self {
        self.full_info = on;
        self
    }
    /// Ask for block size constraints or not.
    pub fn block_size(mut self, on: bool) -> Self {
        self.block_size = on;
        self
    }
}

/// The 16 transmission flags of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct TransmissionFlags(pub u16);

impl TransmissionFlags {
    /// The raw bits.
    pub fn bits(self) -> u16 {
        self.0
    }
    fn has(self, f: u16) -> bool {
        self.0 & tflags::HAS_FLAGS != 0 && self.0 & f != 0
    }
    /// `NBD_FLAG_READ_ONLY`.
    pub fn is_read_only(self) -> bool {
        self.has(tflags::READ_ONLY)
    }
    /// `NBD_FLAG_ROTATIONAL`.
    pub fn is_rotational(self) -> bool {
        self.has(tflags::ROTATIONAL)
    }
    /// `NBD_FLAG_SEND_FLUSH`.
    pub fn can_flush(self) -> bool {
        self.has(tflags::SEND_FLUSH)
    }
    /// `NBD_FLAG_SEND_FUA`.
    pub fn can_fua(self) -> bool {
        self.has(tflags::SEND_FUA)
    }
    /// `NBD_FLAG_SEND_TRIM`.
    pub fn can_trim(self) -> bool {
        self.has(tflags::SEND_TRIM)
    }
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub fn can_zero(self) -> bool {
        self.has(tflags::SEND_WRITE_ZEROES)
    }
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub fn can_fast_zero(self) -> bool {
        self.has(tflags::SEND_FAST_ZERO)
    }
    /// `NBD_FLAG_SEND_DF` (usable only with structured replies).
    pub fn can_df(self) -> bool {
        self.has(tflags::SEND_DF)
    }
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub fn can_multi_conn(self) -> bool {
        self.has(tflags::CAN_MULTI_CONN)
    }
    /// `NBD_FLAG_SEND_CACHE`.
    pub fn can_cache(self) -> bool {
        self.has(tflags::SEND_CACHE)
    }
    /// `NBD_FLAG_BLOCK_STATUS_PAYLOAD` (filtered block status; only
    /// meaningful with extended headers).
    pub fn can_block_status_payload(self) -> bool {
        self.has(tflags::BLOCK_STATUS_PAYLOAD)
    }
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSizes {
    /// Minimum block size (alignment of every request).
    pub minimum: u32,
    /// Preferred block size.
    pub preferred: u32,
    /// Maximum payload of a read or write.
    pub maximum: u32,
}

impl BlockSizes {
    /// Check the constraints the client relies on: the minimum a power
    /// of 2 up to 64K, the preferred a power of 2 no smaller, the
    /// maximum no smaller than the minimum.
    pub fn validate(&self) -> Result<(), String> {
        let BlockSizes {
            minimum: min,
            preferred: pref,
            maximum: max,
        } = *self;
        if !min.is_power_of_two() || min > 65536 {
            return Err(format!(
                "minimum block size {min} is not a power of 2 up to 64K"
            ));
        }
        if !pref.is_power_of_two() || pref < min {
            return Err(format!(
                "preferred block size {pref} is not a power of 2 of at least {min}"
            ));
        }
        if max < min {
            return Err(format!(
                "maximum payload {max} is smaller than the minimum block size {min}"
            ));
        }
        Ok(())
    }
}

/// A negotiated meta context.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MetaContext {
    /// The server's id for it (valid for this connection only).
    pub id: u32,
    /// Its name, like `base:allocation`.
    pub name: String,
}

/// What the server said about an export (`NBD_OPT_INFO`, `NBD_OPT_GO`,
/// or the older `NBD_OPT_EXPORT_NAME` and oldstyle handshakes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The name we asked for.
    pub export_name: String,
    /// The server's canonical name (`NBD_INFO_NAME`), if it sent one.
    pub canonical_name: Option<String>,
    /// The description (`NBD_INFO_DESCRIPTION`), if it sent one.
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: TransmissionFlags,
    /// Block size constraints, if the server advertised them.
    pub block_size: Option<BlockSizes>,
    /// Meta contexts the server selected for this export.
    pub meta_contexts: Vec<MetaContext>,
    /// Structured replies were negotiated on this connection (also
    /// true with extended headers, which imply them).
    pub structured_replies: bool,
    /// Extended headers were negotiated on this connection.
    pub extended_headers: bool,
}

impl ExportInfo {
    /// `NBD_FLAG_READ_ONLY`.
    pub fn is_read_only(&self) -> bool {
        self.flags.is_read_only()
    }
    /// `NBD_FLAG_ROTATIONAL`.
    pub fn is_rotational(&self) -> bool {
        self.flags.is_rotational()
    }
    /// The server understands flush.
    pub fn can_flush(&self) -> bool {
        self.flags.can_flush()
    }
    /// The server understands FUA.
    pub fn can_fua(&self) -> bool {
        self.flags.can_fua()
    }
    /// The server understands trim.
    pub fn can_trim(&self) -> bool {
        self.flags.can_trim()
    }
    /// The server understands write zeroes.
    pub fn can_zero(&self) -> bool {
        self.flags.can_zero()
    }
    /// The server understands fast zero.
    pub fn can_fast_zero(&self) -> bool {
        self.flags.can_fast_zero()
    }
    /// The server understands "don't fragment" reads (needs structured
    /// replies).
    pub fn can_df(&self) -> bool {
        self.structured_replies && self.flags.can_df()
    }
    /// Several connections see a consistent view.
    pub fn can_multi_conn(&self) -> bool {
        self.flags.can_multi_conn()
    }
    /// The server understands cache.
    pub fn can_cache(&self) -> bool {
        self.flags.can_cache()
    }
    /// Was this meta context negotiated?
    pub fn can_meta_context(&self, name: &str) -> bool {
        self.meta_contexts.iter().any(|c| c.name == name)
    }
    /// The export's name as the server calls it: the canonical name if
    /// it sent one, else the name we asked for.
    pub fn name(&self) -> &str {
        self.canonical_name.as_deref().unwrap_or(&self.export_name)
    }
}

/// One block status descriptor: `length` bytes with status `flags`
/// (for `base:allocation`, `protocol::alloc::HOLE | ZERO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusExtent {
    /// Length in bytes (never 0; over 4G only with extended headers).
    pub length: u64,
    /// Status flags, meaning defined by the context.
    pub flags: u32,
}

/// The extents of one meta context in a block status reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextStatus {
    /// The context's name.
    pub name: String,
    /// Consecutive extents starting at the request's offset.
    pub extents: Vec<StatusExtent>,
}

/// A block status reply: one entry per negotiated meta context, in the
/// order they were negotiated.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlockStatus {
    /// Per context extents.
    pub contexts: Vec<ContextStatus>,
}

impl BlockStatus {
    /// The extents of a context, by name.
    pub fn get(&self, name: &str) -> Option<&[StatusExtent]> {
        self.contexts
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.extents.as_slice())
    }
}

/// Counters of one connection's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Requests sent.
    pub requests: u64,
    /// Payload bytes sent (writes).
    pub bytes_sent: u64,
    /// Read payload bytes received (data only, not holes).
    pub bytes_received: u64,
    /// Simple replies received.
    pub simple_replies: u64,
    /// Structured reply chunks received.
    pub chunks: u64,
    /// `NBD_REPLY_TYPE_OFFSET_HOLE` chunks received.
    pub hole_chunks: u64,
}
