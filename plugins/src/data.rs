//! # data: a disk written on the command line
//!
//! Serves a small amount of data given directly on the command line, in
//! a compact data language, as base64 or as a raw string, optionally
//! padded or truncated to a size. The disk is held in memory and is
//! writable; writes are lost when the server exits.
//!
//! ```text
//! nbdkit data '0 1 2 3 @0x1fe 0x55 0xaa'
//! nbdkit data ' ( 0x55 0xAA )*2048 '
//! nbdkit data ' ( "Hello" )*2000 ' size=8192
//! nbdkit data '0 1 2 3 @^0x200 @-2 le16:0xaa55'
//! nbdkit data ' <file1 @^512 <file2 @^512 '
//! nbdkit data '$pattern*16' pattern='0x55 0xAA'
//! nbdkit data base64=MTIz size=1M
//! nbdkit data raw='Hello, world!'
//! ```
//!
//! ## Parameters
//!
//! Exactly one of `data`, `base64` and `raw` must be given.
//!
//! - `[data=]DATA`: the disk in the data language below.
//! - `base64=BASE64`: the disk as base64 (whitespace is ignored).
//! - `raw=BINARY`: the disk as the literal bytes of the parameter.
//! - `size=SIZE`: truncate or extend (with zeroes) the disk to this size;
//!   by default the size is the end of the data.
//! - `allocator=sparse|zstd|malloc[,mlock=true]`: as for the memory
//!   plugin (see [`crate::sparse`]).
//! - any other `KEY=VALUE`: a variable for `$KEY` in the data.
//!
//! ## The data language
//!
//! The data is a list of fields separated by whitespace, written into the
//! disk at a current offset that starts at 0. The size of a group (and of
//! the whole disk) is the largest offset reached in it.
//!
//! - `BYTE`: a byte, in decimal, octal (`0` prefix) or hexadecimal (`0x`
//!   prefix), 0 to 255; the offset advances by 1.
//! - `le16:WORD`, `be16:`, `le32:`, `be32:`, `le64:`, `be64:`: a 16, 32
//!   or 64-bit word in little or big endian.
//! - `"STRING"`: the bytes of a string, with C escapes (`\n`, `\t`,
//!   `\\`, `\"`, `\xHH`, `\NNN` octal, ...).
//! - `@OFFSET`: move to an absolute offset; `@+N` and `@-N` move forward
//!   and back; `@^ALIGNMENT` moves forward to a multiple of a power of 2.
//! - `<FILE`: the contents of a file (the name cannot contain whitespace).
//! - `<(SCRIPT)`: the standard output of a `/bin/sh` script; parentheses
//!   inside must be balanced. An infinite output must be cut with a slice
//!   (`<(yes)[:512]`).
//! - `( ... )`: a group, with its own offsets starting at 0 and its own
//!   scope of names. A group overwrites everything it spans, gaps included.
//! - `EXPR * N`: the expression repeated N times.
//! - `EXPR[N:M]`: bytes N to M-1 of the expression (`[:M]`, `[N:]`).
//! - `EXPR -> \NAME`: give the expression a name (nothing is written);
//!   `\NAME` writes it. Names are visible in the scope where they are
//!   defined and the groups nested in it.
//! - `$VAR`: the value of a parameter `VAR=...` or else of the
//!   environment variable, itself in the data language, as a group.
//! - `# COMMENT`: a comment to the end of the line.
//!
//! Errors name the offset in the string where they were found.
//!
//! ## Behaviour
//!
//! As the memory plugin: writable, flush and FUA are no-ops, trim and
//! zero are native and fast, extents report the data and the holes,
//! multi-conn is safe, cache is a no-op.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::Arc;

use async_trait::async_trait;
use libnbd::{ConfigError, ConfigResult, Handle, OpenContext, Params, Plugin, PluginEntry, Result};

use crate::sparse::{is_zero, memory_limit, Allocator, Store, StoreHandle};

/// The registry entry of the data plugin.
pub const ENTRY: PluginEntry = PluginEntry {
    name: "data",
    help: "data|raw|base64=...     Specify disk data on the command line\n\
           size=<SIZE>             Size of the backing disk\n\
           allocator=sparse|...    Backend allocation strategy",
    magic: Some("data"),
    create,
};

/// The largest disk size and offset: 2^63-1.
const MAX_SIZE: u64 = i64::MAX as u64;

/// Expressions at most this long are flattened when repeated.
const FLATTEN_LIMIT: u64 = 64 * 1024;

/// At most this many segments in one image.
const MAX_SEGMENTS: usize = 1 << 20;

/// How deeply `$VAR`s may nest.
const MAX_DEPTH: usize = 64;

/// How deeply expressions may nest (groups, `*N` and `[N:M]` on
/// expressions, `$VAR`s): parsing and evaluating recurse, and a string of
/// 30,000 `(` overflowed the stack.
const MAX_NESTING: usize = 256;

fn too_deep(pos: usize) -> String {
    at(
        pos,
        format!("expressions nested too deeply (more than {MAX_NESTING} levels)"),
    )
}

/// The configured data plugin: one store shared by all connections.
pub struct DataPlugin {
    store: Arc<Store>,
}

/// Build the data plugin from `data=`, `raw=` or `base64=`, `size=`,
/// `allocator=` and variables.
pub fn create(params: &mut Params) -> ConfigResult<Arc<dyn Plugin>> {
    let data = params.take_all("data");
    let raw = params.take_all("raw");
    let b64 = params.take_all("base64");
    let size = params.take_size("size")?;
    let alloc = match params.take("allocator") {
        Some(a) => Allocator::parse(&a)?,
        None => Allocator::Sparse,
    };
    // Every other parameter is a variable for `$VAR`.
    let mut vars = HashMap::new();
    let keys: Vec<String> = params.items().iter().map(|(k, _)| k.clone()).collect();
    for k in keys {
        if let Some(v) = params.take(&k) {
            vars.insert(k, v);
        }
    }
    if data.len() + raw.len() + b64.len() != 1 {
        return Err(ConfigError::new(
            "data: raw|base64|data parameter must be specified exactly once",
        ));
    }
    let image = if let Some(d) = data.first() {
        evaluate(d, &vars).map_err(|e| ConfigError::new(format!("data: {e}")))?
    } else if let Some(r) = raw.first() {
        Image::bytes(r.as_bytes().to_vec())
    } else {
        let bytes =
            base64_decode(&b64[0]).map_err(|e| ConfigError::new(format!("data: base64: {e}")))?;
        Image::bytes(bytes)
    };
    let size = size.unwrap_or(image.len);
    let store = Store::new(alloc, size)?;
    image.apply(&store)?;
    Ok(Arc::new(DataPlugin {
        store: Arc::new(store),
    }))
}

#[async_trait]
impl Plugin for DataPlugin {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(StoreHandle::new(self.store.clone())))
    }
    fn after_fork(&self, _: &Arc<libnbd::server::ServerContext>) -> Result<()> {
        self.store.lock()
    }
    fn dump(&self) -> Vec<(String, String)> {
        vec![
            ("data_base64".into(), "yes".into()),
            ("mlock".into(), "yes".into()),
            ("zstd".into(), "yes".into()),
        ]
    }
}

/// Decode standard base64 (whitespace ignored, padding optional).
pub fn base64_decode(s: &str) -> Result<Vec<u8>, String> {
    use base64::engine::{general_purpose::GeneralPurposeConfig, DecodePaddingMode};
    use base64::{alphabet, engine::GeneralPurpose, Engine};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let chars: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT.decode(chars).map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------
// Images: what an expression evaluates to.

/// A run of bytes: `pat` repeated cyclically from `pat[phase]`, `len`
/// bytes long.
#[derive(Debug, Clone)]
struct Seg {
    pat: Arc<[u8]>,
    phase: usize,
    len: u64,
}

impl Seg {
    /// `pat` repeated to `len` bytes. Short patterns are widened so that
    /// filling copies big pieces.
    fn repeated(pat: Vec<u8>, len: u64) -> Seg {
        let mut pat = pat;
        if pat.len() < 4096 && (pat.len() as u64) < len {
            let unit = pat.clone();
            while pat.len() < 4096 {
                pat.extend_from_slice(&unit);
            }
        }
        Seg {
            pat: pat.into(),
            phase: 0,
            len,
        }
    }

    fn slice(&self, from: u64, len: u64) -> Seg {
        let plen = self.pat.len() as u64;
        Seg {
            pat: self.pat.clone(),
            phase: ((self.phase as u64 + from % plen) % plen) as usize,
            len,
        }
    }

    /// Copy bytes from position `from` of the run into `out`.
    fn fill(&self, out: &mut [u8], from: u64) {
        let plen = self.pat.len();
        if plen == 1 {
            out.fill(self.pat[0]);
            return;
        }
        let mut i = ((self.phase as u64 + from % plen as u64) % plen as u64) as usize;
        let mut done = 0;
        while done < out.len() {
            let n = (plen - i).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.pat[i..i + n]);
            done += n;
            i = 0;
        }
    }

    fn is_zero(&self) -> bool {
        is_zero(&self.pat)
    }
}

/// The value of an expression: `len` bytes, zero except for
/// non-overlapping segments (keyed by their start).
#[derive(Debug, Clone, Default)]
struct Image {
    len: u64,
    segs: BTreeMap<u64, Seg>,
}

impl Image {
    fn bytes(v: Vec<u8>) -> Image {
        let mut img = Image {
            len: v.len() as u64,
            segs: BTreeMap::new(),
        };
        if !v.is_empty() {
            let len = v.len() as u64;
            img.segs.insert(
                0,
                Seg {
                    pat: v.into(),
                    phase: 0,
                    len,
                },
            );
        }
        img
    }

    /// Remove everything in `[a, b)`, splitting segments at the edges.
    fn clear(&mut self, a: u64, b: u64) {
        if a >= b {
            return;
        }
        let mut hit: Vec<u64> = Vec::new();
        if let Some((&s, seg)) = self.segs.range(..a).next_back() {
            if s + seg.len > a {
                hit.push(s);
            }
        }
        hit.extend(self.segs.range(a..b).map(|(&s, _)| s));
        for s in hit {
            let seg = self.segs.remove(&s).expect("segment exists");
            let e = s + seg.len;
            if s < a {
                self.segs.insert(s, seg.slice(0, a - s));
            }
            if e > b {
                self.segs.insert(b, seg.slice(b - s, e - b));
            }
        }
    }

    /// Write `other` over `[at, at + other.len)`, gaps included.
    fn overwrite(&mut self, at: u64, other: &Image) -> Result<(), String> {
        let end = at
            .checked_add(other.len)
            .filter(|e| *e <= MAX_SIZE)
            .ok_or("the data goes beyond the largest size (2^63-1)")?;
        self.clear(at, end);
        for (&s, seg) in &other.segs {
            self.segs.insert(at + s, seg.clone());
        }
        if self.segs.len() > MAX_SEGMENTS {
            return Err("the data is too complex (too many separate pieces)".into());
        }
        self.len = self.len.max(end);
        Ok(())
    }

    /// Bytes `[a, b)`.
    fn slice(&self, a: u64, b: u64) -> Image {
        let mut out = Image {
            len: b - a,
            segs: BTreeMap::new(),
        };
        let first = match self.segs.range(..a).next_back() {
            Some((&s, seg)) if s + seg.len > a => s,
            _ => a,
        };
        for (&s, seg) in self.segs.range(first..b) {
            let (from, to) = (s.max(a), (s + seg.len).min(b));
            if from < to {
                out.segs.insert(from - a, seg.slice(from - s, to - from));
            }
        }
        out
    }

    /// All the bytes (for small images).
    fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        for (&s, seg) in &self.segs {
            seg.fill(&mut v[s as usize..(s + seg.len) as usize], 0);
        }
        v
    }

    /// The image repeated `n` times.
    fn repeat(&self, n: u64) -> Result<Image, String> {
        let total = self
            .len
            .checked_mul(n)
            .filter(|t| *t <= MAX_SIZE)
            .ok_or("repetition goes beyond the largest size (2^63-1)")?;
        let mut out = Image {
            len: total,
            segs: BTreeMap::new(),
        };
        if self.segs.is_empty() || total == 0 || n == 1 {
            if n == 1 {
                out.segs = self.segs.clone();
            }
            return Ok(out);
        }
        if let Some((0, seg)) = self.segs.first_key_value() {
            if self.segs.len() == 1
                && seg.len == self.len
                && seg.phase == 0
                && seg.len % seg.pat.len() as u64 == 0
            {
                out.segs.insert(0, Seg::repeated(seg.pat.to_vec(), total));
                return Ok(out);
            }
        }
        if self.len <= FLATTEN_LIMIT {
            let v = self.to_vec();
            if !is_zero(&v) {
                out.segs.insert(0, Seg::repeated(v, total));
            }
            return Ok(out);
        }
        if (self.segs.len() as u64).saturating_mul(n) > MAX_SEGMENTS as u64 {
            return Err("the data is too complex (too many separate pieces)".into());
        }
        for i in 0..n {
            for (&s, seg) in &self.segs {
                out.segs.insert(i * self.len + s, seg.clone());
            }
        }
        Ok(out)
    }

    /// Write the image into a fresh (all zero) store, clipped to its size.
    fn apply(&self, store: &Store) -> ConfigResult<()> {
        let size = store.size();
        let limit = memory_limit().unwrap_or(u64::MAX);
        let needed: u64 = self
            .segs
            .iter()
            .filter(|(&s, seg)| s < size && !seg.is_zero())
            .map(|(&s, seg)| seg.len.min(size - s))
            .fold(0u64, |a, b| a.saturating_add(b));
        let too_big = || {
            ConfigError::new(format!(
                "data: the data needs more memory than this machine has ({limit} bytes)"
            ))
        };
        // Patterns with gaps may allocate only half of what they span.
        if needed / 2 > limit {
            return Err(too_big());
        }
        let mut buf = Vec::new();
        for (&s, seg) in &self.segs {
            if s >= size || seg.is_zero() {
                continue;
            }
            let len = seg.len.min(size - s);
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(1 << 20) as usize;
                buf.resize(n, 0);
                seg.fill(&mut buf, done);
                store
                    .write(&buf, s + done)
                    .map_err(|e| ConfigError::new(format!("data: {e}")))?;
                done += n as u64;
                if store.allocated() > limit {
                    return Err(too_big());
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------
// The parser.

/// An expression: something with a value (bytes).
#[derive(Debug, Clone)]
enum Node {
    /// Literal bytes (bytes, words, strings).
    Bytes(Vec<u8>),
    /// `( ... )`.
    Group(Vec<Item>),
    /// `<FILE`.
    File(String, usize),
    /// `<(SCRIPT)`.
    Script(String, usize),
    /// `\NAME`.
    Name(String, usize),
    /// `$VAR`.
    Var(String, usize),
    /// `EXPR * N`.
    Repeat(Box<Node>, u64),
    /// `EXPR[N:M]`.
    Slice(Box<Node>, Option<u64>, Option<u64>, usize),
}

impl Node {
    /// Where it is in the string, if known.
    fn pos(&self) -> usize {
        match self {
            Node::File(_, p) | Node::Script(_, p) | Node::Name(_, p) | Node::Var(_, p) => *p,
            Node::Slice(_, _, _, p) => *p,
            Node::Repeat(inner, _) => inner.pos(),
            Node::Bytes(_) | Node::Group(_) => 0,
        }
    }
}

/// A field of a sequence.
#[derive(Debug, Clone)]
enum Item {
    Expr(Node),
    /// `@N`.
    Offset(u64),
    /// `@+N`.
    Forward(u64, usize),
    /// `@-N`.
    Back(u64, usize),
    /// `@^N`.
    Align(u64, usize),
    /// `EXPR -> \NAME`.
    Assign(Node, String),
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    /// Groups open around the position.
    nest: usize,
    /// The depth of the expression parsed last (its nodes one inside the
    /// other; of a sequence: its deepest).
    sub: usize,
}

/// An error with the offset where it was found.
fn at(pos: usize, msg: impl std::fmt::Display) -> String {
    format!("offset {pos}: {msg}")
}

fn is_name_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'-'
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn peek_at(&self, n: usize) -> Option<u8> {
        self.s.get(self.pos + n).copied()
    }

    /// Skip whitespace and comments.
    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if c.is_ascii_whitespace() {
                self.pos += 1;
            } else if c == b'#' {
                while self.peek().is_some_and(|c| c != b'\n') {
                    self.pos += 1;
                }
            } else {
                break;
            }
        }
    }

    /// A sequence up to the end (or the `)` closing a group opened at
    /// `open`).
    fn seq(&mut self, open: Option<usize>) -> Result<Vec<Item>, String> {
        let mut items: Vec<Item> = Vec::new();
        let mut deepest = 0;
        loop {
            self.skip_ws();
            match self.peek() {
                None => match open {
                    Some(o) => return Err(at(o, "unmatched '(' in data string")),
                    None => {
                        self.sub = deepest;
                        return Ok(items);
                    }
                },
                Some(b')') => match open {
                    Some(_) => {
                        self.pos += 1;
                        self.sub = deepest;
                        return Ok(items);
                    }
                    None => return Err(at(self.pos, "unmatched ')' in data string")),
                },
                Some(_) => {
                    let item = self.item()?;
                    deepest = deepest.max(self.sub);
                    // Merge runs of literal bytes.
                    if let (Some(Item::Expr(Node::Bytes(a))), Item::Expr(Node::Bytes(b))) =
                        (items.last_mut(), &item)
                    {
                        a.extend_from_slice(b);
                    } else {
                        items.push(item);
                    }
                }
            }
        }
    }

    /// A number: decimal, octal (`0` prefix) or hexadecimal (`0x`).
    fn number(&mut self, what: &str) -> Result<u64, String> {
        let start = self.pos;
        let (radix, digits_start) = match (self.peek(), self.peek_at(1)) {
            (Some(b'0'), Some(b'x' | b'X')) => (16, start + 2),
            // A leading 0 means octal; "09" is 0 then 9, as strtol reads it.
            (Some(b'0'), Some(b'0'..=b'9')) => (8, start),
            (Some(b'0'..=b'9'), _) => (10, start),
            _ => return Err(at(start, format!("expected a number for {what}"))),
        };
        self.pos = digits_start;
        while self.peek().is_some_and(|c| (c as char).is_digit(radix)) {
            self.pos += 1;
        }
        let digits = std::str::from_utf8(&self.s[digits_start..self.pos]).unwrap_or("");
        if digits.is_empty() {
            return Err(at(start, format!("expected hexadecimal digits for {what}")));
        }
        u64::from_str_radix(digits, radix)
            .map_err(|_| at(start, format!("number too large for {what}")))
    }

    /// A number for an offset or a count, at most 2^63-1.
    fn offset(&mut self, what: &str) -> Result<u64, String> {
        let start = self.pos;
        let n = self.number(what)?;
        if n > MAX_SIZE {
            return Err(at(start, format!("{what} must be at most 2^63-1")));
        }
        Ok(n)
    }

    fn name(&mut self, allow_dash: bool) -> String {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| is_name_char(c) && (allow_dash || c != b'-'))
        {
            self.pos += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.pos]).into_owned()
    }

    fn item(&mut self) -> Result<Item, String> {
        let start = self.pos;
        self.sub = 0;
        if self.peek() == Some(b'@') {
            self.pos += 1;
            return match self.peek() {
                Some(b'+') => {
                    self.pos += 1;
                    Ok(Item::Forward(self.offset("@+N")?, start))
                }
                Some(b'-') => {
                    self.pos += 1;
                    Ok(Item::Back(self.offset("@-N")?, start))
                }
                Some(b'^') => {
                    self.pos += 1;
                    let n = self.offset("@^ALIGNMENT")?;
                    if !n.is_power_of_two() {
                        return Err(at(
                            start,
                            format!("@^{n}: the alignment must be a power of 2"),
                        ));
                    }
                    Ok(Item::Align(n, start))
                }
                Some(b'0'..=b'9') => Ok(Item::Offset(self.offset("@OFFSET")?)),
                _ => Err(at(
                    start,
                    "'@' must be followed by OFFSET, +N, -N or ^ALIGNMENT",
                )),
            };
        }
        let node = self.primary()?;
        self.postfix(node)
    }

    fn primary(&mut self) -> Result<Node, String> {
        let start = self.pos;
        self.sub = 1;
        let c = self.peek().unwrap_or(0);
        let rest = &self.s[self.pos..];
        for (prefix, bytes, le) in [
            ("le16:", 2, true),
            ("be16:", 2, false),
            ("le32:", 4, true),
            ("be32:", 4, false),
            ("le64:", 8, true),
            ("be64:", 8, false),
        ] {
            if rest.starts_with(prefix.as_bytes()) {
                self.pos += prefix.len();
                let n = self.number(prefix)?;
                if bytes < 8 && n >> (bytes * 8) != 0 {
                    return Err(at(start, format!("{prefix}{n}: the word is too large")));
                }
                let v = if le {
                    n.to_le_bytes()[..bytes].to_vec()
                } else {
                    n.to_be_bytes()[8 - bytes..].to_vec()
                };
                return Ok(Node::Bytes(v));
            }
        }
        match c {
            b'(' => {
                if self.nest >= MAX_NESTING {
                    return Err(too_deep(start));
                }
                self.pos += 1;
                self.nest += 1;
                let items = self.seq(Some(start));
                self.nest -= 1;
                self.sub += 1;
                Ok(Node::Group(items?))
            }
            b'0'..=b'9' => {
                let n = self.number("BYTE")?;
                if n > 255 {
                    return Err(at(start, format!("BYTE {n} must be in the range 0..255")));
                }
                Ok(Node::Bytes(vec![n as u8]))
            }
            b'"' => self.string(),
            b'<' if self.peek_at(1) == Some(b'(') => {
                self.pos += 2;
                let body = self.pos;
                let mut depth = 1;
                while depth > 0 {
                    match self.peek() {
                        None => return Err(at(start, "unmatched '(' in <(SCRIPT)")),
                        Some(b'(') => depth += 1,
                        Some(b')') => depth -= 1,
                        _ => {}
                    }
                    self.pos += 1;
                }
                let script = String::from_utf8_lossy(&self.s[body..self.pos - 1]).into_owned();
                Ok(Node::Script(script, start))
            }
            b'<' => {
                self.pos += 1;
                let body = self.pos;
                while self
                    .peek()
                    .is_some_and(|c| !c.is_ascii_whitespace() && !b"[*()#".contains(&c))
                {
                    self.pos += 1;
                }
                if body == self.pos {
                    return Err(at(start, "'<' must be followed by a file name"));
                }
                let path = String::from_utf8_lossy(&self.s[body..self.pos]).into_owned();
                Ok(Node::File(path, start))
            }
            b'\\' => {
                self.pos += 1;
                let name = self.name(true);
                if name.is_empty() {
                    return Err(at(start, "'\\' must be followed by a name"));
                }
                Ok(Node::Name(name, start))
            }
            b'$' => {
                self.pos += 1;
                let name = self.name(false);
                if name.is_empty() {
                    return Err(at(start, "'$' must be followed by a variable name"));
                }
                Ok(Node::Var(name, start))
            }
            b'*' | b'[' => Err(at(
                start,
                format!("'{}' must follow an expression", c as char),
            )),
            b'-' if self.peek_at(1) == Some(b'>') => {
                Err(at(start, "'->' must follow an expression"))
            }
            _ => {
                let ch = std::str::from_utf8(rest)
                    .ok()
                    .and_then(|s| s.chars().next())
                    .unwrap_or(c as char);
                Err(at(start, format!("unexpected character '{ch}'")))
            }
        }
    }

    fn string(&mut self) -> Result<Node, String> {
        let start = self.pos;
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(at(start, "unterminated string"));
            };
            self.pos += 1;
            match c {
                b'"' => return Ok(Node::Bytes(out)),
                b'\\' => {
                    let esc = self.pos - 1;
                    let Some(e) = self.peek() else {
                        return Err(at(start, "unterminated string"));
                    };
                    self.pos += 1;
                    let b = match e {
                        b'a' => 7,
                        b'b' => 8,
                        b'f' => 12,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'v' => 11,
                        b'x' => {
                            let from = self.pos;
                            while self.pos < from + 2
                                && self.peek().is_some_and(|c| c.is_ascii_hexdigit())
                            {
                                self.pos += 1;
                            }
                            let d = std::str::from_utf8(&self.s[from..self.pos]).unwrap_or("");
                            u8::from_str_radix(d, 16)
                                .map_err(|_| at(esc, "\\x must be followed by hex digits"))?
                        }
                        b'0'..=b'7' => {
                            let from = self.pos - 1;
                            while self.pos < from + 3 && matches!(self.peek(), Some(b'0'..=b'7')) {
                                self.pos += 1;
                            }
                            let d = std::str::from_utf8(&self.s[from..self.pos]).unwrap_or("");
                            u8::from_str_radix(d, 8)
                                .map_err(|_| at(esc, "octal escape out of range"))?
                        }
                        b'u' | b'U' => {
                            return Err(at(esc, "unicode escapes are not supported in strings"))
                        }
                        other => other,
                    };
                    out.push(b);
                }
                _ => out.push(c),
            }
        }
    }

    fn postfix(&mut self, mut node: Node) -> Result<Item, String> {
        loop {
            let save = self.pos;
            self.skip_ws();
            let start = self.pos;
            // `*N` and `[N:M]` wrap the expression: that nests too.
            if matches!(self.peek(), Some(b'*' | b'[')) {
                self.sub += 1;
                if self.nest + self.sub > MAX_NESTING {
                    return Err(too_deep(start));
                }
            }
            match self.peek() {
                Some(b'*') => {
                    self.pos += 1;
                    self.skip_ws();
                    let n = self.offset("*N")?;
                    node = Node::Repeat(Box::new(node), n);
                }
                Some(b'[') => {
                    self.pos += 1;
                    self.skip_ws();
                    let a = match self.peek() {
                        Some(b'0'..=b'9') => Some(self.offset("[N:M]")?),
                        _ => None,
                    };
                    self.skip_ws();
                    if self.peek() != Some(b':') {
                        return Err(at(self.pos, "expected ':' in [N:M]"));
                    }
                    self.pos += 1;
                    self.skip_ws();
                    let b = match self.peek() {
                        Some(b'0'..=b'9') => Some(self.offset("[N:M]")?),
                        _ => None,
                    };
                    self.skip_ws();
                    if self.peek() != Some(b']') {
                        return Err(at(self.pos, "expected ']' at the end of [N:M]"));
                    }
                    self.pos += 1;
                    node = Node::Slice(Box::new(node), a, b, start);
                }
                Some(b'-') if self.peek_at(1) == Some(b'>') => {
                    self.pos += 2;
                    self.skip_ws();
                    if self.peek() != Some(b'\\') {
                        return Err(at(self.pos, "'->' must be followed by \\NAME"));
                    }
                    self.pos += 1;
                    let name = self.name(true);
                    if name.is_empty() {
                        return Err(at(self.pos, "'->' must be followed by \\NAME"));
                    }
                    return Ok(Item::Assign(node, name));
                }
                _ => {
                    self.pos = save;
                    return Ok(Item::Expr(node));
                }
            }
        }
    }
}

/// Parse a string of the data language.
fn parse(s: &str) -> Result<Vec<Item>, String> {
    Parser {
        s: s.as_bytes(),
        pos: 0,
        nest: 0,
        sub: 0,
    }
    .seq(None)
}

// ---------------------------------------------------------------------
// Evaluation.

struct Eval<'a> {
    vars: &'a HashMap<String, String>,
    scopes: Vec<HashMap<String, Arc<Image>>>,
    depth: usize,
    /// Expressions being evaluated, one inside the other.
    nest: usize,
    /// Read no file, run no script, see no environment (the fuzzer).
    sandbox: bool,
}

/// Read at most `limit` bytes (everything if `None`).
fn read_limited(r: impl Read, limit: Option<u64>) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    match limit {
        Some(n) => r.take(n).read_to_end(&mut v)?,
        None => {
            let mut r = r;
            r.read_to_end(&mut v)?
        }
    };
    Ok(v)
}

impl Eval<'_> {
    fn seq(&mut self, items: &[Item]) -> Result<Image, String> {
        self.scopes.push(HashMap::new());
        let r = self.seq_in_scope(items);
        self.scopes.pop();
        r
    }

    fn seq_in_scope(&mut self, items: &[Item]) -> Result<Image, String> {
        let mut img = Image::default();
        let mut cur = 0u64;
        let too_far = |pos| at(pos, "offset beyond the largest size (2^63-1)");
        for item in items {
            match item {
                Item::Expr(node) => {
                    let sub = self.node(node, None)?;
                    img.overwrite(cur, &sub)?;
                    cur += sub.len;
                }
                Item::Offset(n) => cur = *n,
                Item::Forward(n, pos) => {
                    cur = cur
                        .checked_add(*n)
                        .filter(|c| *c <= MAX_SIZE)
                        .ok_or_else(|| too_far(*pos))?
                }
                Item::Back(n, pos) => {
                    cur = cur.checked_sub(*n).ok_or_else(|| {
                        at(
                            *pos,
                            format!("@-{n} must not be larger than the current offset {cur}"),
                        )
                    })?
                }
                Item::Align(n, pos) => {
                    cur = cur
                        .checked_next_multiple_of(*n)
                        .filter(|c| *c <= MAX_SIZE)
                        .ok_or_else(|| too_far(*pos))?
                }
                Item::Assign(node, name) => {
                    let v = self.node(node, None)?;
                    if let Some(scope) = self.scopes.last_mut() {
                        scope.insert(name.clone(), Arc::new(v));
                    }
                }
            }
            img.len = img.len.max(cur);
        }
        Ok(img)
    }

    /// Evaluate an expression; `limit` says at most that many bytes of
    /// it will be used (so a file or script need not be read further).
    fn node(&mut self, node: &Node, limit: Option<u64>) -> Result<Image, String> {
        // A parsed string nests at most MAX_NESTING deep; `$VAR`s may
        // nest strings, up to twice that in all.
        if self.nest >= 2 * MAX_NESTING {
            return Err(too_deep(node.pos()));
        }
        self.nest += 1;
        let r = self.node_in(node, limit);
        self.nest -= 1;
        r
    }

    fn node_in(&mut self, node: &Node, limit: Option<u64>) -> Result<Image, String> {
        match node {
            Node::Bytes(v) => Ok(Image::bytes(v.clone())),
            Node::Group(items) => self.seq(items),
            Node::File(_, pos) | Node::Script(_, pos) if self.sandbox => {
                Err(at(*pos, "no files or scripts in the sandbox"))
            }
            Node::File(path, pos) => {
                let f = std::fs::File::open(path).map_err(|e| at(*pos, format!("{path}: {e}")))?;
                let v = read_limited(f, limit).map_err(|e| at(*pos, format!("{path}: {e}")))?;
                Ok(Image::bytes(v))
            }
            Node::Script(script, pos) => run_script(script, limit)
                .map(Image::bytes)
                .map_err(|e| at(*pos, e)),
            Node::Name(name, pos) => self
                .scopes
                .iter()
                .rev()
                .find_map(|s| s.get(name))
                .map(|img| (**img).clone())
                .ok_or_else(|| at(*pos, format!("\\{name} not defined"))),
            Node::Var(name, pos) => {
                let value = match self.vars.get(name) {
                    Some(v) => v.clone(),
                    None if self.sandbox => {
                        return Err(at(*pos, format!("${name}: variable not found")))
                    }
                    None => std::env::var(name)
                        .map_err(|_| at(*pos, format!("${name}: variable not found")))?,
                };
                if self.depth >= MAX_DEPTH {
                    return Err(at(
                        *pos,
                        format!(
                            "${name}: variables nested too deeply (is the definition recursive?)"
                        ),
                    ));
                }
                let items = parse(&value).map_err(|e| format!("${name}: {e}"))?;
                self.depth += 1;
                let r = self.seq(&items).map_err(|e| format!("${name}: {e}"));
                self.depth -= 1;
                r
            }
            Node::Repeat(inner, n) => {
                let img = self.node(inner, None)?;
                img.repeat(*n)
            }
            Node::Slice(inner, a, b, pos) => {
                let img = self.node(inner, *b)?;
                let a = a.unwrap_or(0);
                let b = b.unwrap_or(img.len);
                if a > b || b > img.len {
                    return Err(at(
                        *pos,
                        format!(
                            "[{a}:{b}] does not describe a valid slice of an expression of length {}",
                            img.len
                        ),
                    ));
                }
                Ok(img.slice(a, b))
            }
        }
    }
}

/// Run a script with `/bin/sh`, returning its output (at most `limit`
/// bytes; the script is then killed).
fn run_script(script: &str, limit: Option<u64>) -> Result<Vec<u8>, String> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("<(SCRIPT): /bin/sh: {e}"))?;
    let out = child.stdout.take().expect("stdout is piped");
    let v = read_limited(out, limit).map_err(|e| format!("<(SCRIPT): reading output: {e}"));
    let truncated = matches!((&v, limit), (Ok(v), Some(n)) if v.len() as u64 >= n);
    if truncated {
        let _ = child.kill();
    }
    let status = child.wait().map_err(|e| format!("<(SCRIPT): {e}"))?;
    let v = v?;
    if !truncated && !status.success() {
        return Err(format!("<(SCRIPT): external command failed ({status})"));
    }
    Ok(v)
}

/// Evaluate a data string with the given variables.
fn evaluate(s: &str, vars: &HashMap<String, String>) -> Result<Image, String> {
    let items = parse(s)?;
    Eval {
        vars,
        scopes: Vec::new(),
        depth: 0,
        nest: 0,
        sandbox: false,
    }
    .seq(&items)
}

/// Evaluate a data string as `data=` does but reading no file, running no
/// script and seeing no environment variable, and check the image's
/// invariants (segments in order, apart, inside it; its bytes up to 64 KiB):
/// its length. For the fuzzers (`fuzz-targets`).
#[doc(hidden)]
pub fn fuzz_evaluate(s: &str, vars: &HashMap<String, String>) -> Result<u64, String> {
    let items = parse(s)?;
    let img = Eval {
        vars,
        scopes: Vec::new(),
        depth: 0,
        nest: 0,
        sandbox: true,
    }
    .seq(&items)?;
    assert!(img.len <= MAX_SIZE, "image of {} bytes", img.len);
    let mut end = 0;
    for (&start, seg) in &img.segs {
        assert!(
            start >= end,
            "segment at {start} overlaps one ending at {end}"
        );
        assert!(
            !seg.pat.is_empty() && seg.phase < seg.pat.len(),
            "bad segment"
        );
        end = start + seg.len;
        assert!(end <= img.len, "segment past the image's end");
    }
    if img.len <= 64 << 10 {
        assert_eq!(img.to_vec().len() as u64, img.len);
    }
    Ok(img.len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use libnbd::backend::HOLE_ZERO;
    use libnbd::{Cache, Extents, Flags, Fua};

    /// The disk for these arguments, as bytes.
    fn disk(args: &[&str]) -> Vec<u8> {
        try_disk(args).unwrap()
    }

    fn try_disk(args: &[&str]) -> Result<Vec<u8>, String> {
        let mut p = Params::parse(args, Some("data")).map_err(|e| e.0)?;
        ENTRY.configure(&mut p).map_err(|e| e.0)?;
        // Recreate to read the store (the plugin hides it).
        let mut p = Params::parse(args, Some("data")).unwrap();
        let plugin = ENTRY.configure(&mut p).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let h = plugin.open(&OpenContext::default()).await.unwrap();
            let mut v = vec![0u8; h.size().unwrap() as usize];
            h.pread(&mut v, 0, Flags::NONE).await.unwrap();
            Ok(v)
        })
    }

    fn err(args: &[&str]) -> String {
        try_disk(args).expect_err("should fail")
    }

    #[test]
    fn bytes_and_offsets() {
        assert_eq!(disk(&["1 2 3"]), [1, 2, 3]);
        assert_eq!(disk(&["010 0x1F 0X1f 255"]), [8, 31, 31, 255]);
        assert_eq!(disk(&["09"]), [0, 9]);
        assert_eq!(disk(&["@4"]), [0; 4]);
        assert_eq!(disk(&["1 @-1"]), [1]);
        assert_eq!(disk(&["1 2 3 @1"]), [1, 2, 3]);
        assert_eq!(disk(&["1 2 @0 3"]), [3, 2]);
        assert_eq!(disk(&["@+2 1"]), [0, 0, 1]);
        assert_eq!(disk(&["1 @^4 2 @^4"]), [1, 0, 0, 0, 2, 0, 0, 0]);
        let mbr = disk(&["0 1 2 3 @^0x200 @-2 le16:0xaa55"]);
        assert_eq!(mbr.len(), 512);
        assert_eq!(&mbr[..4], [0, 1, 2, 3]);
        assert_eq!(&mbr[510..], [0x55, 0xaa]);
        let m = disk(&["0 1 2 3 @0x1fe 0x55 0xaa"]);
        assert_eq!(m, mbr);
        assert_eq!(disk(&[""]), [0u8; 0]);
        assert_eq!(disk(&["1 # comment\n2\t3"]), [1, 2, 3]);
    }

    #[test]
    fn words() {
        assert_eq!(
            disk(&["le16:0x1234 be16:0x1234 le32:1 be64:1"]),
            [0x34, 0x12, 0x12, 0x34, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(disk(&["be32:0x1"]), [0, 0, 0, 1]);
        assert_eq!(disk(&["le64:0xffffffffffffffff"]), [0xff; 8]);
        assert!(err(&["le16:65536"]).contains("too large"));
        assert!(err(&["le16:"]).contains("number"));
    }

    #[test]
    fn strings() {
        assert_eq!(disk(&[r#""abc" "\\ \t""#]), b"abc\\ \t");
        assert_eq!(disk(&[r#""\x41\101\n\"\q""#]), b"AA\n\"q");
        assert_eq!(disk(&["\"h\u{e9}\""]), "h\u{e9}".as_bytes());
        assert_eq!(disk(&[r#""ab"*2"#]), b"abab");
        assert_eq!(disk(&[r#""abc"[1:]"#]), b"bc");
        assert!(err(&[r#""abc"#]).contains("unterminated"));
    }

    #[test]
    fn deep_nesting_is_an_error() {
        // Each of these overflowed the stack (of the main thread too).
        let deep = [
            "(".repeat(30_000),
            format!("{}1{}", "(".repeat(30_000), ")".repeat(30_000)),
            format!("1{}", "*1".repeat(30_000)),
            format!("1{}", "[:1]".repeat(30_000)),
            format!("{}1{}", "(".repeat(200), "*1)".repeat(200)),
            format!(
                "{}1{}",
                "(".repeat(100),
                format!("{})", "*1".repeat(100)).repeat(100)
            ),
        ];
        for d in deep {
            let e = err(&[&d]);
            assert!(e.contains("nested too deeply"), "{e}");
        }
        // Variables nesting deep strings.
        let v = format!("v={}$w{}", "(".repeat(200), ")".repeat(200));
        let w = format!("w={}$x{}", "(".repeat(200), ")".repeat(200));
        let x = format!("x={}1{}", "(".repeat(200), ")".repeat(200));
        let e = err(&["$v", &v, &w, &x]);
        assert!(e.contains("nested too deeply"), "{e}");
        // As deep as allowed.
        let ok = format!("{}1{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        assert_eq!(disk(&[&ok]), [1]);
        let ok = format!("1{}", "*1".repeat(MAX_NESTING - 1));
        assert_eq!(disk(&[&ok]), [1]);
        let v = format!("v={}1{}", "(".repeat(200), ")".repeat(200));
        let ok = format!("{}$v{}", "(".repeat(200), ")".repeat(200));
        assert_eq!(disk(&[&ok, &v]), [1]);
    }

    #[test]
    fn groups_repeats_slices() {
        assert_eq!(disk(&["0x55*4"]), [0x55; 4]);
        assert_eq!(disk(&["0x55 * 4"]), [0x55; 4]);
        assert_eq!(disk(&["(1 2)*3"]), [1, 2, 1, 2, 1, 2]);
        assert_eq!(disk(&["( 1 2 )*2*3"]), [1, 2].repeat(6));
        assert_eq!(disk(&["( 1 @8 )*2"]).len(), 16);
        assert_eq!(disk(&["( @2 1 2 )*2"]), [0, 0, 1, 2, 0, 0, 1, 2]);
        assert_eq!(disk(&["( 1 2 3 4 5 )[1:3]"]), [2, 3]);
        assert_eq!(disk(&["( 1 2 3 4 5 )[2:]"]), [3, 4, 5]);
        assert_eq!(disk(&["( 1 2 3 4 5 )[:2]"]), [1, 2]);
        assert_eq!(disk(&["( 1 2 3 )[1:1]"]), [0u8; 0]);
        assert_eq!(disk(&["(1)[0:1]*2"]), [1, 1]);
        assert_eq!(disk(&["1*0"]), [0u8; 0]);
        assert_eq!(disk(&["@0x10 ( 1 )"]).len(), 17);
        // Groups overwrite their whole span, gaps included.
        assert_eq!(disk(&["1 2 3 @0 ( @2 9 )"]), [0, 0, 9]);
        assert_eq!(disk(&["1 2 3 4 @0 ( 9 @4 )"]), [9, 0, 0, 0]);
        assert_eq!(disk(&["1 2 3 4 @0 ( 9 @2 )*2"]), [9, 0, 9, 0]);
        assert_eq!(disk(&["1 2 3 4 @0 0*2"]), [0, 0, 3, 4]);
        assert_eq!(disk(&["1 2 3 4 @0 ( 9 @3 )[1:3]"]), [0, 0, 3, 4]);
        // Big repetitions stay cheap.
        let d = disk(&["( 0x55 0xAA )*2048"]);
        assert_eq!(d.len(), 4096);
        assert!(d.chunks(2).all(|c| c == [0x55, 0xAA]));
        let d = disk(&["( \"Hello\" )*2000", "size=8192"]);
        assert_eq!(d.len(), 8192);
        assert_eq!(&d[8190..], b"He");
        // A big sparse repetition.
        let d = disk(&["( 1 @100000 )*3 ( 2 @70000 ) *2"]);
        assert_eq!(d.len(), 440000);
        for (i, &b) in d.iter().enumerate() {
            let want = match i {
                0 | 100000 | 200000 => 1,
                300000 | 370000 => 2,
                _ => 0,
            };
            assert_eq!(b, want, "byte {i}");
        }
        assert!(err(&["( 1 2 )[3:1]"]).contains("slice"));
        assert!(err(&["( 1 2 )[0:5]"]).contains("slice"));
        assert!(err(&["1 2 3 4 [1:2]"]).contains("slice"));
    }

    #[test]
    fn names_and_variables() {
        assert_eq!(
            disk(&[r"( 0x55 0xAA ) -> \a \a \a"]),
            [0x55, 0xAA, 0x55, 0xAA]
        );
        assert_eq!(
            disk(&[r"( 0x55 0xAA ) -> \sig ( @4 \sig ) -> \sector \sector \sector"]),
            [0, 0, 0, 0, 0x55, 0xAA, 0, 0, 0, 0, 0x55, 0xAA]
        );
        assert_eq!(disk(&[r"1 -> \n ( \n )"]), [1]);
        assert_eq!(disk(&[r"( 1 ) -> \x ( 2 ) -> \x \x"]), [2]);
        assert!(err(&[r"( 1 -> \x ) \x"]).contains(r"\x not defined"));
        assert!(err(&[r"\a"]).contains("not defined"));
        assert_eq!(disk(&["$p*2", "p=1 2"]), [1, 2, 1, 2]);
        assert_eq!(disk(&["$a_b", "a_b=1 2"]), [1, 2]);
        assert_eq!(disk(&["$a[1:]", "a=1 2"]), [2]);
        assert_eq!(disk(&["( $a )", "a=1 @4"]), [1, 0, 0, 0]);
        assert_eq!(disk(&[r"1 -> \n $x", r"x=\n"]), [1]);
        assert!(err(&["$nosuchvariable_xyz"]).contains("variable not found"));
        assert!(err(&["$p", "p=$p"]).contains("nested too deeply"));
        assert!(err(&["$p", "p=1 )"]).contains("$p: offset 2"));
    }

    #[test]
    fn files_and_scripts() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("h.txt");
        std::fs::write(&f, "hello").unwrap();
        let f = f.to_str().unwrap();
        assert_eq!(disk(&[&format!("<{f} 1")]), b"hello\x01");
        assert_eq!(disk(&[&format!("<{f}[1:3]*2")]), b"elel");
        assert_eq!(disk(&[&format!("( <{f} )")]), b"hello");
        assert_eq!(
            disk(&[&format!(" <{f} @^8 <{f} @^8 ")]),
            b"hello\0\0\0hello\0\0\0"
        );
        assert!(err(&["</nonexistent/file"]).contains("No such file"));
        assert_eq!(disk(&["<(printf abc) 1"]), b"abc\x01");
        assert_eq!(disk(&["<(echo $((1+2)) )"]), b"3\n");
        assert_eq!(disk(&["<(yes)[:6]"]), b"y\ny\ny\n");
        assert_eq!(disk(&["</dev/zero[:4]*2"]), [0u8; 8]);
        assert!(err(&["<(exit 1)"]).contains("failed"));
    }

    #[test]
    fn raw_base64_size() {
        assert_eq!(disk(&["raw=hello"]), b"hello");
        assert_eq!(disk(&["base64=MTIz"]), b"123");
        assert_eq!(
            disk(&["base64=aGVsbG8gbmJka2l0IHVzZXI="]),
            b"hello nbdkit user"
        );
        assert_eq!(disk(&["base64=aGk"]), b"hi");
        assert!(err(&["base64=a*b"]).contains("base64"));
        assert_eq!(disk(&["1 2 3", "size=2"]), [1, 2]);
        assert_eq!(disk(&["1 2 3", "size=6"]), [1, 2, 3, 0, 0, 0]);
        let m = disk(&["base64=MTIz", "size=1M"]);
        assert_eq!(m.len(), 1 << 20);
        assert!(err(&["1", "raw=x"]).contains("exactly once"));
        assert!(err(&["size=1"]).contains("exactly once"));
        assert!(err(&["1", "data=2"]).contains("exactly once"));
        assert_eq!(disk(&["1", "allocator=malloc"]), [1]);
        assert_eq!(disk(&["1 2", "allocator=zstd"]), [1, 2]);
    }

    #[test]
    fn syntax_errors() {
        assert!(err(&["256"]).contains("range 0..255"));
        assert!(err(&["x"]).contains("offset 0: unexpected character 'x'"));
        assert!(err(&["1 ) 2"]).contains("offset 2: unmatched ')'"));
        assert!(err(&["( 1 2"]).contains("offset 0: unmatched '('"));
        assert!(err(&["1 2 3 @-4"]).contains("current offset 3"));
        assert!(err(&["@1K"]).contains("offset 2"));
        assert!(err(&["0x"]).contains("hexadecimal"));
        assert!(err(&["@^3"]).contains("power of 2"));
        assert!(err(&["@^0"]).contains("power of 2"));
        assert!(err(&["@x"]).contains("'@' must be followed"));
        assert!(err(&["*2"]).contains("must follow an expression"));
        assert!(err(&["@9223372036854775807 1"]).contains("2^63-1"));
        assert!(err(&["@9223372036854775808"]).contains("2^63-1"));
        assert!(err(&["1*9223372036854775807 1"]).contains("2^63-1"));
        assert!(err(&["1 -> x"]).contains("\\NAME"));
        assert!(err(&["( 1 2 )[1 2]"]).contains("':'"));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn writable_sparse_disk() {
        let mut p = Params::parse(&["1 2 3 @65536 1 @131072"], Some("data")).unwrap();
        let plugin = ENTRY.configure(&mut p).unwrap();
        let h = plugin.open(&OpenContext::default()).await.unwrap();
        assert_eq!(h.size().unwrap(), 131072);
        assert!(h.caps().unwrap().write && h.caps().unwrap().trim && h.caps().unwrap().zero);
        assert!(h.caps().unwrap().fast_zero && h.caps().unwrap().extents);
        assert_eq!(h.caps().unwrap().fua, Fua::Native);
        assert_eq!(h.caps().unwrap().cache, Cache::Native);
        assert!(h.caps().unwrap().multi_conn);
        let mut e = Extents::new(0, 131072);
        h.extents(131072, 0, Flags::NONE, &mut e).await.unwrap();
        let got: Vec<_> = e
            .list()
            .iter()
            .map(|x| (x.offset, x.length, x.flags))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 32768, 0),
                (32768, 32768, HOLE_ZERO),
                (65536, 32768, 0),
                (98304, 32768, HOLE_ZERO)
            ]
        );
        h.pwrite(b"xyz", 100, Flags::NONE).await.unwrap();
        let mut b = [0u8; 3];
        h.pread(&mut b, 100, Flags::NONE).await.unwrap();
        assert_eq!(&b, b"xyz");
        // The same disk for every connection.
        let h2 = plugin.open(&OpenContext::default()).await.unwrap();
        h2.pread(&mut b, 100, Flags::NONE).await.unwrap();
        assert_eq!(&b, b"xyz");
    }

    #[test]
    fn unknown_keys_are_variables() {
        assert_eq!(disk(&["1", "foo=bar"]), [1]);
    }
}
