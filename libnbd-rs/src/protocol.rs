//! The NBD wire protocol: constants, and encoding and decoding of the
//! handshake, options, requests and replies, with no I/O.
//!
//! Names follow `reference/nbd-protocol.md` with the `NBD_` prefix removed.
//! Every length and offset read from the wire is checked by the decoder
//! or by its caller before it is used.

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic, also prefixes every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Oldstyle negotiation magic (`cliserv_magic`).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic that prefixes every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x3_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended (32-byte) request, once `NBD_OPT_EXTENDED_HEADERS`
/// was negotiated.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of an extended (32-byte) reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits, sent with the export size).
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// The server understands `NBD_CMD_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The server understands `NBD_CMD_FLAG_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export is on rotational media.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// The server understands `NBD_CMD_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// The server understands `NBD_CMD_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The server understands `NBD_CMD_FLAG_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see a consistent view.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// The server understands `NBD_CMD_RESIZE`.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// The server understands `NBD_CMD_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// The server understands `NBD_CMD_FLAG_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// The server understands `NBD_CMD_FLAG_PAYLOAD_LEN` on block status
    /// (extended headers only).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Option numbers.
pub mod opt {
    /// Choose an export, old way: no error reply possible.
    pub const EXPORT_NAME: u32 = 1;
    /// Abort negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn.
    pub const PEEK_EXPORT: u32 = 4;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Choose an export, new way.
    pub const GO: u32 = 7;
    /// Enable structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List meta contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select meta contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Enable 64-bit headers.
    pub const EXTENDED_HEADERS: u32 = 11;

    /// The option's name, for debugging messages.
    pub fn name(o: u32) -> &'static str {
        match o {
            EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
            ABORT => "NBD_OPT_ABORT",
            LIST => "NBD_OPT_LIST",
            PEEK_EXPORT => "NBD_OPT_PEEK_EXPORT",
            STARTTLS => "NBD_OPT_STARTTLS",
            INFO => "NBD_OPT_INFO",
            GO => "NBD_OPT_GO",
            STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
            LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
            SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
            EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
            _ => "unknown option",
        }
    }
}

/// Option reply types.
pub mod rep {
    /// Success, end of the reply.
    pub const ACK: u32 = 1;
    /// An export in `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// An information item for `NBD_OPT_INFO`/`NBD_OPT_GO`.
    pub const INFO: u32 = 3;
    /// A meta context.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set on every error reply.
    pub const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// Export not available.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// Block size negotiation required.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// Request or reply too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
    /// Extended headers required first (or already negotiated, for
    /// `NBD_OPT_STRUCTURED_REPLY`).
    pub const ERR_EXT_HEADER_REQD: u32 = ERR | 10;
}

/// Information types of `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Cache (prefetch).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize.
    pub const RESIZE: u16 = 8;

    /// The command's name, for logs.
    pub fn name(c: u16) -> &'static str {
        match c {
            READ => "NBD_CMD_READ",
            WRITE => "NBD_CMD_WRITE",
            DISC => "NBD_CMD_DISC",
            FLUSH => "NBD_CMD_FLUSH",
            TRIM => "NBD_CMD_TRIM",
            CACHE => "NBD_CMD_CACHE",
            WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
            BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
            RESIZE => "NBD_CMD_RESIZE",
            _ => "unknown command",
        }
    }
}

/// Command flags.
pub mod cmdflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes without punching a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment the read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail zero fast if it would be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length is a payload length (a write's data).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk flags and types.
pub mod reply {
    /// Last chunk of the reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload; only valid with DONE.
    pub const TYPE_NONE: u16 = 0;
    /// Offset and data.
    pub const TYPE_OFFSET_DATA: u16 = 1;
    /// Offset and length of a hole (reads as zeroes).
    pub const TYPE_OFFSET_HOLE: u16 = 2;
    /// Block status descriptors for a meta context.
    pub const TYPE_BLOCK_STATUS: u16 = 5;
    /// Block status with 64-bit lengths (extended headers only).
    pub const TYPE_BLOCK_STATUS_EXT: u16 = 6;
    /// Error with no offset.
    pub const TYPE_ERROR: u16 = (1 << 15) | 1;
    /// Error with offset.
    pub const TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

    /// Is this reply type an error?
    pub fn is_error(t: u16) -> bool {
        t & (1 << 15) != 0
    }
}

/// Errors on the wire (values are Linux errno numbers, fixed by the spec).
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// The wire error for a host errno (anything unknown becomes EINVAL,
    /// as the spec recommends).
    pub fn from_host(e: i32) -> u32 {
        match e {
            libc::EPERM | libc::EACCES | libc::EROFS => EPERM,
            libc::EIO => EIO,
            libc::ENOMEM => ENOMEM,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::ENOTSUP | libc::ENOSYS => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EINVAL,
        }
    }

    /// The host errno for a wire error.
    pub fn to_host(e: u32) -> i32 {
        match e {
            EPERM => libc::EPERM,
            EIO => libc::EIO,
            ENOMEM => libc::ENOMEM,
            EINVAL => libc::EINVAL,
            ENOSPC => libc::ENOSPC,
            EOVERFLOW => libc::EOVERFLOW,
            ENOTSUP => libc::ENOTSUP,
            ESHUTDOWN => libc::ESHUTDOWN,
            _ => libc::EINVAL,
        }
    }

    /// A short name for an error, like `strerror`.
    pub fn describe(e: u32) -> String {
        std::io::Error::from_raw_os_error(to_host(e)).to_string()
    }
}

/// Flags of `base:allocation` extents.
pub mod alloc {
    /// Not allocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The name of the allocation meta context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// qemu's meta context saying which layer of a backing chain holds each
/// range (0: none, 1: the top image, 2: its backing file...).
pub const CONTEXT_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";

/// Largest string (export name, description, context name) we accept.
pub const MAX_STRING: usize = 4096;
/// Largest option payload we accept during negotiation.
pub const MAX_OPTION_LEN: u32 = 65536;
/// Largest read or write request payload (as upstream nbdkit).
pub const MAX_REQUEST_SIZE: u32 = 64 * 1024 * 1024;

/// Length of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Length of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;

/// A transmission-phase request header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`cmdflag`).
    pub flags: u16,
    /// Command type (`cmd`).
    pub typ: u16,
    /// Opaque handle echoed in the reply.
    pub cookie: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes: a payload or effect length, 64 bits with
    /// extended headers, at most 32 bits in the compact header.
    pub count: u64,
}

impl Request {
    /// Encode the 28-byte (compact) header; the caller keeps `count`
    /// within 32 bits.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        debug_assert!(self.count <= u64::from(u32::MAX));
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&(self.count as u32).to_be_bytes());
        b
    }

    /// Encode the 32-byte extended header.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        b[0..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..32].copy_from_slice(&self.count.to_be_bytes());
        b
    }

    /// Decode the 32-byte extended header; `None` when the magic is wrong.
    pub fn decode_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Option<Request> {
        if be32(&b[0..4]) != EXTENDED_REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(&b[4..6]),
            typ: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            count: be64(&b[24..32]),
        })
    }

    /// Decode the 28-byte header; `None` when the magic is wrong.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(&b[4..6]),
            typ: be16(&b[6..8]),
            cookie: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            count: u64::from(be32(&b[24..28])),
        })
    }
}

/// Encode a simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encode a structured reply chunk header.
pub fn structured_reply(
    cookie: u64,
    flags: u16,
    typ: u16,
    length: u32,
) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Encode an extended reply chunk header: `offset` is the request's.
pub fn extended_reply(
    cookie: u64,
    flags: u16,
    typ: u16,
    offset: u64,
    length: u64,
) -> [u8; EXTENDED_REPLY_LEN] {
    let mut b = [0u8; EXTENDED_REPLY_LEN];
    b[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&length.to_be_bytes());
    b
}

/// Encode an option request header (client to server).
pub fn option_header(option: u32, len: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&len.to_be_bytes());
    b
}

/// Encode an option reply header (server to client).
pub fn option_reply_header(option: u32, reply: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A decoded option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    /// The option this answers.
    pub option: u32,
    /// Reply type (`rep`).
    pub reply: u32,
    /// Payload length.
    pub len: u32,
}

impl OptionReply {
    /// Decode a 20-byte option reply header; `None` when the magic is wrong.
    pub fn decode(b: &[u8; 20]) -> Option<OptionReply> {
        if be64(&b[0..8]) != OPTION_REPLY_MAGIC {
            return None;
        }
        Some(OptionReply {
            option: be32(&b[8..12]),
            reply: be32(&b[12..16]),
            len: be32(&b[16..20]),
        })
    }
}

/// Encode the payload of `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Encode the payload of `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// Encode an `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` payload.
pub fn info_string(typ: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// A cursor over an option payload, checking every length against what
/// is left.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Read from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// Take `n` bytes, or `None` if fewer are left.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    /// Big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(be16)
    }
    /// Big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(be32)
    }
    /// Big-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(be64)
    }
    /// A string of `n` bytes (UTF-8, or `None`).
    pub fn string(&mut self, n: usize) -> Option<String> {
        let b = self.bytes(n)?;
        String::from_utf8(b.to_vec()).ok()
    }
    /// A string prefixed by its u32 length.
    pub fn string32(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        self.string(n)
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// Read a big-endian u16 from the first 2 bytes.
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
/// Read a big-endian u32 from the first 4 bytes.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
/// Read a big-endian u64 from the first 8 bytes.
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[0..8]);
    u64::from_be_bytes(a)
}

/// Encode a payload of a length-prefixed string (for LIST replies, meta
/// context queries and the like).
pub fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let r = Request {
            flags: cmdflag::FUA,
            typ: cmd::WRITE,
            cookie: 0x1122334455667788,
            offset: 1 << 40,
            count: 4096,
        };
        assert_eq!(Request::decode(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert_eq!(Request::decode(&bad), None);
        let big = Request {
            count: 5 << 40,
            ..r
        };
        assert_eq!(Request::decode_extended(&big.encode_extended()), Some(big));
        assert_eq!(Request::decode_extended(&[0u8; EXTENDED_REQUEST_LEN]), None);
    }

    #[test]
    fn reader_checks_lengths() {
        let mut r = Reader::new(&[0, 0, 0, 5, b'a', b'b']);
        assert_eq!(r.string32(), None);
        let mut r = Reader::new(&[0, 0, 0, 2, b'a', b'b']);
        assert_eq!(r.string32().as_deref(), Some("ab"));
        assert_eq!(r.u16(), None);
    }

    #[test]
    fn option_reply_roundtrip() {
        let h = option_reply_header(opt::GO, rep::ERR_UNKNOWN, 7);
        let d = OptionReply::decode(&h).unwrap();
        assert_eq!((d.option, d.reply, d.len), (opt::GO, rep::ERR_UNKNOWN, 7));
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno::from_host(libc::EROFS), errno::EPERM);
        assert_eq!(errno::from_host(libc::EBADF), errno::EINVAL);
        assert_eq!(errno::to_host(errno::ENOSPC), libc::ENOSPC);
    }
}
