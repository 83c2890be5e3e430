//! # luks: read and write LUKSv1-encrypted disks and partitions
//!
//! The layer below holds a LUKSv1 volume (`cryptsetup luksFormat --type
//! luks1`, or `qemu-img create -f luks`); clients see its decrypted
//! payload, readable and writable: reads are decrypted and writes
//! encrypted sector by sector, as dm-crypt and qemu do, so the volume
//! stays usable by them. The filter cannot create volumes, change
//! passphrases or add key slots (use cryptsetup for that).
//!
//! ```text
//! nbdkit file encrypted-disk.img --filter=luks passphrase=+/tmp/secret
//! nbdkit file encrypted-disk.img --filter=luks passphrase=+/tmp/secret --filter=partition partition=1
//! ```
//!
//! ## Parameters
//!
//! - `passphrase=SECRET`: the passphrase (insecure on shared machines);
//!   `passphrase=-` asks for it on the terminal, `passphrase=+FILENAME`
//!   reads it from a file, `passphrase=-FD` from an inherited file
//!   descriptor (a trailing newline is dropped), as nbdkit's passwords.
//!   Required.
//! - `passphrase-file=FILENAME` (beyond upstream): the same as
//!   `passphrase=+FILENAME`.
//!
//! ## Behaviour
//!
//! When a connection opens, the LUKSv1 header is read and checked (magic,
//! version 1, payload offset, iterations, key slots within the disk), and
//! the passphrase is tried on each active key slot (PBKDF2, then the
//! anti-forensic merge, then the master key's digest). The unlocked
//! master key is kept for the export while its header stays the same, so
//! later connections do not run PBKDF2 again (upstream does, per
//! connection). A wrong passphrase, a non-LUKS or LUKSv2 disk and an
//! unsupported cipher fail the connection with a message saying which.
//!
//! Supported: cipher `aes` with 128, 192 or 256-bit keys in modes `xts`
//! and `cbc`, IV generators `plain`, `plain64` and `essiv:HASH`, and
//! hashes `sha1`, `sha224`, `sha256`, `sha384`, `sha512`, `ripemd160` and
//! `md5` for the key slots. Upstream 1.32 (on GnuTLS) lacks `essiv` (so
//! `aes-cbc-essiv:sha256`, cryptsetup's old default, is ours only) and
//! 192-bit XTS keys; `ecb` and `ctr` are refused, as there.
//!
//! The export is the payload: the disk from the payload offset, its size
//! rounded down to whole 512-byte sectors; the block size is at least 512
//! bytes (unaligned requests are served by reading, and for writes
//! rewriting, the sectors at their ends, under a lock). Zero is done by
//! encrypted writes of zeroes (no fast zero), trim is not offered,
//! extents report all data, cache requests read the sectors below;
//! flush, FUA and multi-conn are those of the layer below.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, BlockSizeUser,
    InnerIvInit, KeyInit,
};
use aes::{Aes128, Aes192, Aes256};
use async_trait::async_trait;
use libnbd::backend::run_blocking;
use libnbd::config::read_password;
use libnbd::{
    BlockSize, Cache, Caps, ConfigError, ConfigResult, Error, Extents, Filter, FilterEntry, Flags,
    Handle, Next, OpenContext, Params, Result,
};
use xts_mode::Xts128;

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "luks",
    help: "\
passphrase=<SECRET>      Secret passphrase.
passphrase-file=<FILE>   Read the passphrase from FILE.",
    create,
};

const SECTOR: u64 = 512;
const HEADER_LEN: usize = 592;
const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const KEY_ENABLED: u32 = 0x00ac_71f3;
const KEY_DISABLED: u32 = 0x0000_dead;
/// Bytes written at a time when zeroing.
const ZERO_CHUNK: u64 = 1 << 20;

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let mut pass = p
        .take("passphrase")
        .map(|v| read_password("passphrase", &v))
        .transpose()?;
    if let Some(f) = p.take("passphrase-file") {
        pass = Some(read_password("passphrase-file", &format!("+{f}"))?);
    }
    let passphrase =
        pass.ok_or_else(|| ConfigError::new("LUKS \"passphrase\" parameter is missing"))?;
    Ok(Arc::new(LuksFilter {
        passphrase,
        volumes: Mutex::new(HashMap::new()),
    }))
}

struct LuksFilter {
    passphrase: String,
    /// The unlocked volume of each export, with the header it came from.
    volumes: Mutex<HashMap<String, Arc<Volume>>>,
}

/// An unlocked volume.
struct Volume {
    header: Vec<u8>,
    crypt: Crypt,
    /// Where the payload starts, in bytes.
    payload: u64,
    /// Held while a write rewrites partial sectors.
    rmw: tokio::sync::Mutex<()>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::eio(msg.into())
}

// ---- Hashes ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Md5,
    Sha1,
    Sha224,
    Sha256,
    Sha384,
    Sha512,
    Ripemd160,
}

macro_rules! with_hash {
    ($h:expr, $D:ident => $body:expr) => {
        match $h {
            Hash::Md5 => {
                type $D = md5::Md5;
                $body
            }
            Hash::Sha1 => {
                type $D = sha1::Sha1;
                $body
            }
            Hash::Sha224 => {
                type $D = sha2::Sha224;
                $body
            }
            Hash::Sha256 => {
                type $D = sha2::Sha256;
                $body
            }
            Hash::Sha384 => {
                type $D = sha2::Sha384;
                $body
            }
            Hash::Sha512 => {
                type $D = sha2::Sha512;
                $body
            }
            Hash::Ripemd160 => {
                type $D = ripemd::Ripemd160;
                $body
            }
        }
    };
}

impl Hash {
    fn parse(s: &str) -> Result<Hash> {
        Ok(match s {
            "md5" => Hash::Md5,
            "sha1" => Hash::Sha1,
            "sha224" => Hash::Sha224,
            "sha256" => Hash::Sha256,
            "sha384" => Hash::Sha384,
            "sha512" => Hash::Sha512,
            "ripemd160" => Hash::Ripemd160,
            _ => {
                return Err(bad(format!(
                    "unknown hash algorithm: {s} (expecting \"sha1\", \"sha256\" etc)"
                )))
            }
        })
    }

    fn digest(self, parts: &[&[u8]]) -> Vec<u8> {
        use sha2::Digest;
        with_hash!(self, D => {
            let mut d = D::new();
            for p in parts {
                d.update(p);
            }
            d.finalize().to_vec()
        })
    }

    fn pbkdf2(self, password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
        with_hash!(self, D => pbkdf2::pbkdf2_hmac::<D>(password, salt, rounds, out))
    }

    /// The anti-forensic diffusion of LUKS: each digest-sized piece of
    /// `block` replaced by the hash of its index and itself.
    fn diffuse(self, block: &mut [u8]) {
        let len = self.digest(&[]).len();
        for (i, piece) in block.chunks_mut(len).enumerate() {
            let h = self.digest(&[&(i as u32).to_be_bytes(), piece]);
            let n = piece.len();
            piece.copy_from_slice(&h[..n]);
        }
    }

    /// Merge the `stripes` anti-forensic stripes of a key of `len` bytes.
    fn af_merge(self, material: &[u8], stripes: usize, len: usize) -> Vec<u8> {
        let mut block = vec![0u8; len];
        for i in 0..stripes {
            let s = &material[i * len..(i + 1) * len];
            for (b, x) in block.iter_mut().zip(s) {
                *b ^= x;
            }
            if i + 1 < stripes {
                self.diffuse(&mut block);
            }
        }
        block
    }
}

// ---- Ciphers ----

#[derive(Clone)]
enum Aes {
    A128(Box<Aes128>),
    A192(Box<Aes192>),
    A256(Box<Aes256>),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        Ok(match key.len() {
            16 => Aes::A128(Box::new(Aes128::new(GenericArray::from_slice(key)))),
            24 => Aes::A192(Box::new(Aes192::new(GenericArray::from_slice(key)))),
            32 => Aes::A256(Box::new(Aes256::new(GenericArray::from_slice(key)))),
            n => return Err(bad(format!("no AES cipher with a {}-bit key", n * 8))),
        })
    }
    fn encrypt_block(&self, b: &mut [u8; 16]) {
        let b = GenericArray::from_mut_slice(b);
        match self {
            Aes::A128(c) => c.encrypt_block(b),
            Aes::A192(c) => c.encrypt_block(b),
            Aes::A256(c) => c.encrypt_block(b),
        }
    }
}

fn cbc_decrypt<C>(c: &C, iv: &[u8; 16], buf: &mut [u8])
where
    C: BlockDecryptMut + BlockCipher + BlockSizeUser<BlockSize = aes::cipher::consts::U16> + Clone,
{
    let mut d = cbc::Decryptor::<C>::inner_iv_init(c.clone(), GenericArray::from_slice(iv));
    for b in buf.chunks_exact_mut(16) {
        d.decrypt_block_mut(GenericArray::from_mut_slice(b));
    }
}

fn cbc_encrypt<C>(c: &C, iv: &[u8; 16], buf: &mut [u8])
where
    C: BlockEncryptMut + BlockCipher + BlockSizeUser<BlockSize = aes::cipher::consts::U16> + Clone,
{
    let mut e = cbc::Encryptor::<C>::inner_iv_init(c.clone(), GenericArray::from_slice(iv));
    for b in buf.chunks_exact_mut(16) {
        e.encrypt_block_mut(GenericArray::from_mut_slice(b));
    }
}

fn xts<C>(key: &[u8]) -> Xts128<C>
where
    C: KeyInit
        + BlockEncrypt
        + BlockDecrypt
        + BlockCipher
        + BlockSizeUser<BlockSize = aes::cipher::consts::U16>,
{
    let (k1, k2) = key.split_at(key.len() / 2);
    Xts128::new(
        C::new(GenericArray::from_slice(k1)),
        C::new(GenericArray::from_slice(k2)),
    )
}

enum Mode {
    Xts128(Box<Xts128<Aes128>>),
    Xts192(Box<Xts128<Aes192>>),
    Xts256(Box<Xts128<Aes256>>),
    Cbc(Aes),
}

enum IvGen {
    Plain,
    Plain64,
    Essiv(Aes),
}

/// The cipher specification of a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Spec {
    xts: bool,
    ivgen: IvKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IvKind {
    Plain,
    Plain64,
    Essiv(Hash),
}

impl Spec {
    /// Parse `cipher_name` and `cipher_mode` (`xts-plain64`,
    /// `cbc-essiv:sha256`) for a key of `key_bytes`.
    fn parse(name: &str, mode: &str, key_bytes: usize) -> Result<Spec> {
        if name != "aes" {
            return Err(bad(format!(
                "unknown cipher algorithm: {name} (expecting \"aes\", etc)"
            )));
        }
        let (m, iv) = mode.split_once('-').ok_or_else(|| {
            bad(format!(
                "incorrect cipher_mode header, expecting mode-ivgenerator but got \"{mode}\""
            ))
        })?;
        let (iv, ivhash) = match iv.split_once(':') {
            Some((a, b)) => (a, Some(Hash::parse(b)?)),
            None => (iv, None),
        };
        let ivgen = match (iv, ivhash) {
            ("plain", _) => IvKind::Plain,
            ("plain64", _) => IvKind::Plain64,
            ("essiv", Some(h)) => IvKind::Essiv(h),
            ("essiv", None) => return Err(bad("incorrect IV generator hash specification")),
            _ => {
                return Err(bad(format!(
                    "unknown IV generation algorithm: {iv} (expecting \"plain\", \"plain64\" or \"essiv\")"
                )))
            }
        };
        let xts = match m {
            "xts" => true,
            "cbc" => false,
            "ecb" | "ctr" => {
                return Err(bad(format!(
                    "cipher mode {m} is not supported (only xts and cbc)"
                )))
            }
            _ => {
                return Err(bad(format!(
                    "unknown cipher mode: {m} (expecting \"xts\", \"cbc\" etc)"
                )))
            }
        };
        let sizes: &[usize] = if xts { &[32, 48, 64] } else { &[16, 24, 32] };
        if !sizes.contains(&key_bytes) {
            return Err(bad(format!(
                "no aes cipher in mode {m} with a {}-bit master key",
                key_bytes * 8
            )));
        }
        Ok(Spec { xts, ivgen })
    }
}

/// Sector encryption with one key.
struct Crypt {
    mode: Mode,
    ivgen: IvGen,
}

impl Crypt {
    fn new(spec: Spec, key: &[u8]) -> Result<Crypt> {
        let mode = if spec.xts {
            match key.len() {
                32 => Mode::Xts128(Box::new(xts(key))),
                48 => Mode::Xts192(Box::new(xts(key))),
                64 => Mode::Xts256(Box::new(xts(key))),
                n => return Err(bad(format!("no XTS cipher with a {}-bit key", n * 8))),
            }
        } else {
            Mode::Cbc(Aes::new(key)?)
        };
        let ivgen = match spec.ivgen {
            IvKind::Plain => IvGen::Plain,
            IvKind::Plain64 => IvGen::Plain64,
            IvKind::Essiv(h) => IvGen::Essiv(
                Aes::new(&h.digest(&[key])).map_err(|e| bad(format!("ESSIV: {}", e.msg)))?,
            ),
        };
        Ok(Crypt { mode, ivgen })
    }

    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match &self.ivgen {
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt_block(&mut iv);
            }
        }
        iv
    }

    /// Decrypt whole sectors, the first being number `first`.
    fn decrypt(&self, first: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            let iv = self.iv(first + i as u64);
            match &self.mode {
                Mode::Xts128(x) => x.decrypt_sector(s, iv),
                Mode::Xts192(x) => x.decrypt_sector(s, iv),
                Mode::Xts256(x) => x.decrypt_sector(s, iv),
                Mode::Cbc(Aes::A128(c)) => cbc_decrypt(&**c, &iv, s),
                Mode::Cbc(Aes::A192(c)) => cbc_decrypt(&**c, &iv, s),
                Mode::Cbc(Aes::A256(c)) => cbc_decrypt(&**c, &iv, s),
            }
        }
    }

    /// Encrypt whole sectors, the first being number `first`.
    fn encrypt(&self, first: u64, buf: &mut [u8]) {
        for (i, s) in buf.chunks_exact_mut(SECTOR as usize).enumerate() {
            let iv = self.iv(first + i as u64);
            match &self.mode {
                Mode::Xts128(x) => x.encrypt_sector(s, iv),
                Mode::Xts192(x) => x.encrypt_sector(s, iv),
                Mode::Xts256(x) => x.encrypt_sector(s, iv),
                Mode::Cbc(Aes::A128(c)) => cbc_encrypt(&**c, &iv, s),
                Mode::Cbc(Aes::A192(c)) => cbc_encrypt(&**c, &iv, s),
                Mode::Cbc(Aes::A256(c)) => cbc_encrypt(&**c, &iv, s),
            }
        }
    }
}

// ---- The header ----

#[derive(Debug, Clone)]
struct Slot {
    active: u32,
    iterations: u32,
    salt: [u8; 32],
    offset: u32,
    stripes: u32,
}

#[derive(Debug, Clone)]
struct Header {
    spec: Spec,
    hash: Hash,
    payload: u32,
    key_bytes: u32,
    digest: [u8; 20],
    salt: [u8; 32],
    iterations: u32,
    slots: Vec<Slot>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn text(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Sectors of key material of a slot: the split key rounded up to 4K.
fn material_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let len = key_bytes as u64 * stripes as u64;
    len.div_ceil(SECTOR).div_ceil(8) * 8
}

/// Parse and check the header of a disk of `size` bytes.
fn parse_header(h: &[u8], size: u64) -> Result<Header> {
    if size < 16384 {
        return Err(bad("disk is too small to be LUKS-encrypted"));
    }
    if &h[..6] != MAGIC {
        return Err(bad("this disk does not contain a LUKS header"));
    }
    let version = u16::from_be_bytes([h[6], h[7]]);
    if version != 1 {
        return Err(bad(format!(
            "this disk contains a LUKS version {version} header, but this filter only supports LUKSv1"
        )));
    }
    let payload = be32(h, 104);
    let key_bytes = be32(h, 108);
    let iterations = be32(h, 164);
    if payload as u64 >= size / SECTOR {
        return Err(bad(
            "bad LUKSv1 header: payload offset points beyond the end of the disk",
        ));
    }
    if iterations == 0 {
        return Err(bad("bad LUKSv1 header: master key iterations is 0"));
    }
    if key_bytes > 1024 || key_bytes == 0 {
        return Err(bad("bad LUKSv1 header: master key is too long"));
    }
    let mut slots = Vec::new();
    for i in 0..8 {
        let s = &h[208 + 48 * i..208 + 48 * (i + 1)];
        let slot = Slot {
            active: be32(s, 0),
            iterations: be32(s, 4),
            salt: s[8..40].try_into().unwrap(),
            offset: be32(s, 40),
            stripes: be32(s, 44),
        };
        match slot.active {
            KEY_ENABLED => {
                if slot.stripes == 0 {
                    return Err(bad(format!("bad LUKSv1 header: key slot {i} is corrupted")));
                }
                if slot.stripes >= 10000 {
                    return Err(bad(format!(
                        "bad LUKSv1 header: key slot {i} stripes too large"
                    )));
                }
                if slot.iterations == 0 {
                    return Err(bad(format!(
                        "bad LUKSv1 header: key slot {i} iterations is 0"
                    )));
                }
                let len = material_sectors(key_bytes, slot.stripes);
                if len > 4096 {
                    return Err(bad(format!(
                        "bad LUKSv1 header: key slot {i} key material length is too large"
                    )));
                }
                if (slot.offset as u64 + len) * SECTOR >= size {
                    return Err(bad(format!(
                        "bad LUKSv1 header: key slot {i} key material offset points beyond the end of the disk"
                    )));
                }
            }
            KEY_DISABLED => {}
            _ => {
                return Err(bad(format!(
                    "bad LUKSv1 header: key slot {i} has an invalid active flag"
                )))
            }
        }
        slots.push(slot);
    }
    let spec = Spec::parse(&text(&h[8..40]), &text(&h[40..72]), key_bytes as usize)?;
    let hash = Hash::parse(&text(&h[72..104]))?;
    Ok(Header {
        spec,
        hash,
        payload,
        key_bytes,
        digest: h[112..132].try_into().unwrap(),
        salt: h[132..164].try_into().unwrap(),
        iterations,
        slots,
    })
}

/// Try the passphrase on every active key slot: the master key.
async fn unlock(next: &dyn Handle, hdr: &Header, passphrase: &[u8]) -> Result<Vec<u8>> {
    let klen = hdr.key_bytes as usize;
    for slot in hdr.slots.iter().filter(|s| s.active == KEY_ENABLED) {
        let mut derived = vec![0u8; klen];
        run_blocking(|| {
            hdr.hash
                .pbkdf2(passphrase, &slot.salt, slot.iterations, &mut derived)
        });
        let split = klen * slot.stripes as usize;
        let mut material = vec![0u8; (split as u64).div_ceil(SECTOR) as usize * SECTOR as usize];
        next.pread(&mut material, slot.offset as u64 * SECTOR, Flags::NONE)
            .await?;
        let key = run_blocking(|| -> Result<Option<Vec<u8>>> {
            Crypt::new(hdr.spec, &derived)?.decrypt(0, &mut material);
            let key = hdr.hash.af_merge(&material, slot.stripes as usize, klen);
            let mut check = [0u8; 20];
            hdr.hash.pbkdf2(&key, &hdr.salt, hdr.iterations, &mut check);
            Ok((check == hdr.digest).then_some(key))
        })?;
        if let Some(k) = key {
            return Ok(k);
        }
    }
    Err(bad(
        "LUKS passphrase is not correct, no key slot could be unlocked",
    ))
}

impl LuksFilter {
    async fn volume(&self, next: &dyn Handle, ctx: &OpenContext) -> Result<Arc<Volume>> {
        let size = next.size()?;
        let mut header = vec![0u8; HEADER_LEN];
        if size >= HEADER_LEN as u64 {
            next.pread(&mut header, 0, Flags::NONE).await?;
        }
        let known = self
            .volumes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&ctx.export_name)
            .filter(|v| v.header == header)
            .cloned();
        if let Some(v) = known {
            return Ok(v);
        }
        let hdr = parse_header(&header, size)?;
        let key = unlock(next, &hdr, self.passphrase.as_bytes()).await?;
        let v = Arc::new(Volume {
            header,
            crypt: Crypt::new(hdr.spec, &key)?,
            payload: hdr.payload as u64 * SECTOR,
            rmw: tokio::sync::Mutex::new(()),
        });
        self.volumes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(ctx.export_name.clone(), v.clone());
        Ok(v)
    }
}

#[async_trait]
impl Filter for LuksFilter {
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        let next = next.open(ctx).await?;
        let vol = self
            .volume(&*next, ctx)
            .await
            .inspect_err(|e| libnbd::elog!("nbdkit: luks[{}]: error: {}", ctx.id, e.msg))?;
        let below = next.size()?;
        let size = below
            .checked_sub(vol.payload)
            .ok_or_else(|| bad("disk too small, or contains an incomplete LUKS partition"))?
            / SECTOR
            * SECTOR;
        Ok(Box::new(LuksHandle { next, vol, size }))
    }
}

struct LuksHandle {
    next: Box<dyn Handle>,
    vol: Arc<Volume>,
    size: u64,
}

impl LuksHandle {
    /// The sector-aligned range `[start, end)` around a request, checked.
    fn span(&self, offset: u64, count: u64) -> Result<(u64, u64)> {
        match offset.checked_add(count) {
            Some(end) if end <= self.size => Ok((
                offset / SECTOR * SECTOR,
                end.div_ceil(SECTOR) * SECTOR,
            )),
            _ => Err(Error::einval(format!(
                "luks: request at {offset} for {count} bytes is beyond the end of the export ({} bytes)",
                self.size
            ))),
        }
    }

    /// Read and decrypt whole sectors at `start` (a payload offset).
    async fn read_sectors(&self, buf: &mut [u8], start: u64, flags: Flags) -> Result<()> {
        self.next
            .pread(buf, self.vol.payload + start, flags)
            .await?;
        run_blocking(|| self.vol.crypt.decrypt(start / SECTOR, buf));
        Ok(())
    }

    /// Encrypt and write whole sectors at `start`.
    async fn write_sectors(&self, mut plain: Vec<u8>, start: u64, flags: Flags) -> Result<()> {
        run_blocking(|| self.vol.crypt.encrypt(start / SECTOR, &mut plain));
        self.next
            .pwrite(&plain, self.vol.payload + start, flags)
            .await
    }
}

#[async_trait]
impl Handle for LuksHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    fn size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn block_size(&self) -> Result<Option<BlockSize>> {
        Ok(Some(match self.next.block_size()? {
            None => BlockSize {
                minimum: SECTOR as u32,
                preferred: SECTOR as u32,
                maximum: u32::MAX,
            },
            Some(b) => {
                let minimum = b.minimum.max(SECTOR as u32);
                BlockSize {
                    minimum,
                    preferred: b.preferred.max(minimum),
                    maximum: b.maximum,
                }
            }
        }))
    }
    fn caps(&self) -> Result<Caps> {
        Ok(Caps {
            trim: false,
            zero: true,
            fast_zero: false,
            extents: false,
            cache: Cache::Emulate,
            ..self.next.caps()?
        })
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let (start, end) = self.span(offset, buf.len() as u64)?;
        if start == offset && end == offset + buf.len() as u64 {
            return self.read_sectors(buf, start, flags).await;
        }
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_sectors(&mut tmp, start, flags).await?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&tmp[at..at + buf.len()]);
        Ok(())
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let len = buf.len() as u64;
        let (start, end) = self.span(offset, len)?;
        let mut plain = vec![0u8; (end - start) as usize];
        if start == offset && end == offset + len {
            plain.copy_from_slice(buf);
            return self.write_sectors(plain, start, flags).await;
        }
        let _lock = self.vol.rmw.lock().await;
        let s = SECTOR as usize;
        if start != offset {
            self.read_sectors(&mut plain[..s], start, Flags::NONE)
                .await?;
        }
        // The last sector is read if the write ends inside it, unless it
        // is the first one, read already.
        let tail_partial = !(offset + len).is_multiple_of(SECTOR);
        let tail_read = end - SECTOR == start && start != offset;
        if tail_partial && !tail_read {
            let n = plain.len();
            self.read_sectors(&mut plain[n - s..], end - SECTOR, Flags::NONE)
                .await?;
        }
        let at = (offset - start) as usize;
        plain[at..at + buf.len()].copy_from_slice(buf);
        self.write_sectors(plain, start, flags).await
    }
    async fn trim(&self, _count: u64, _offset: u64, _flags: Flags) -> Result<()> {
        Err(Error::enotsup("luks: trim is not supported"))
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        if flags.contains(Flags::FAST_ZERO) {
            return Err(Error::enotsup("luks: fast zero is not supported"));
        }
        self.span(offset, count)?;
        let flags = flags.without(Flags::MAY_TRIM);
        let zeroes = vec![0u8; count.min(ZERO_CHUNK) as usize];
        let mut done = 0;
        while done < count {
            let n = (count - done).min(ZERO_CHUNK) as usize;
            self.pwrite(&zeroes[..n], offset + done, flags).await?;
            done += n as u64;
        }
        Ok(())
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        _flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        ext.add(offset, count, 0)
    }
    async fn cache(&self, count: u64, offset: u64, _flags: Flags) -> Result<()> {
        let (start, end) = self.span(offset, count)?;
        let mut buf = vec![0u8; (end - start).min(ZERO_CHUNK) as usize];
        let mut at = start;
        while at < end {
            let n = (end - at).min(ZERO_CHUNK) as usize;
            self.next
                .pread(&mut buf[..n], self.vol.payload + at, Flags::NONE)
                .await?;
            at += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::*;

    /// Split `key` into `stripes` stripes the way cryptsetup does (random
    /// stripes, the last one making the merge come out as `key`).
    fn af_split(h: Hash, key: &[u8], stripes: usize) -> Vec<u8> {
        let len = key.len();
        let mut out = Vec::new();
        let mut block = vec![0u8; len];
        for i in 0..stripes - 1 {
            let s: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
            for (b, x) in block.iter_mut().zip(&s) {
                *b ^= x;
            }
            h.diffuse(&mut block);
            out.extend(s);
        }
        out.extend(block.iter().zip(key).map(|(b, k)| b ^ k));
        out
    }

    /// A LUKSv1 volume of `size` bytes in memory with one key slot (slot
    /// 1, as if slot 0 had been removed), made with our own primitives.
    fn volume(mode: &str, key_bytes: usize, hash: &str, pass: &str, size: usize) -> Vec<u8> {
        let h = Hash::parse(hash).unwrap();
        let spec = Spec::parse("aes", mode, key_bytes).unwrap();
        let mk: Vec<u8> = (0..key_bytes).map(|i| (i * 13 + 5) as u8).collect();
        let stripes = 4000;
        let mut d = vec![0u8; size];
        d[..6].copy_from_slice(MAGIC);
        d[6..8].copy_from_slice(&1u16.to_be_bytes());
        d[8..11].copy_from_slice(b"aes");
        d[40..40 + mode.len()].copy_from_slice(mode.as_bytes());
        d[72..72 + hash.len()].copy_from_slice(hash.as_bytes());
        let material = material_sectors(key_bytes as u32, stripes);
        let slot_at = 8u32;
        let payload = (slot_at as u64 + material).div_ceil(8) * 8;
        d[104..108].copy_from_slice(&(payload as u32).to_be_bytes());
        d[108..112].copy_from_slice(&(key_bytes as u32).to_be_bytes());
        d[132..164].fill(0x42);
        d[164..168].copy_from_slice(&10u32.to_be_bytes());
        let mut digest = [0u8; 20];
        h.pbkdf2(&mk, &[0x42; 32], 10, &mut digest);
        d[112..132].copy_from_slice(&digest);
        for i in 0..8 {
            let s = 208 + 48 * i;
            d[s..s + 4].copy_from_slice(&KEY_DISABLED.to_be_bytes());
            d[s + 44..s + 48].copy_from_slice(&stripes.to_be_bytes());
        }
        let s = 208 + 48;
        d[s..s + 4].copy_from_slice(&KEY_ENABLED.to_be_bytes());
        d[s + 4..s + 8].copy_from_slice(&7u32.to_be_bytes());
        d[s + 8..s + 40].fill(0x24);
        d[s + 40..s + 44].copy_from_slice(&slot_at.to_be_bytes());
        let mut derived = vec![0u8; key_bytes];
        h.pbkdf2(pass.as_bytes(), &[0x24; 32], 7, &mut derived);
        let mut split = af_split(h, &mk, stripes as usize);
        split.resize(split.len().div_ceil(512) * 512, 0);
        Crypt::new(spec, &derived).unwrap().encrypt(0, &mut split);
        let at = slot_at as usize * 512;
        d[at..at + split.len()].copy_from_slice(&split);
        // The payload: sector n holds the byte n, encrypted.
        let mut plain: Vec<u8> = (0..size - payload as usize * 512)
            .map(|i| (i / 512) as u8)
            .collect();
        Crypt::new(spec, &mk).unwrap().encrypt(0, &mut plain);
        d[payload as usize * 512..].copy_from_slice(&plain);
        d
    }

    fn filter(words: &[&str]) -> Arc<dyn Filter> {
        create(&mut params(words)).unwrap()
    }

    #[tokio::test]
    async fn luks_reads_and_writes_every_mode() {
        for (mode, kb, hash) in [
            ("xts-plain64", 64, "sha256"),
            ("xts-plain64", 32, "sha1"),
            ("xts-plain", 48, "sha512"),
            ("cbc-essiv:sha256", 32, "sha256"),
            ("cbc-plain64", 16, "ripemd160"),
            ("cbc-plain", 24, "sha384"),
        ] {
            let mem = Mem::with(volume(mode, kb, hash, "secret", 1 << 20));
            let s = stack(vec![filter(&["passphrase=secret"])], &mem);
            let h = s.open(&ctx(1)).await.unwrap();
            let size = h.size().unwrap();
            assert!(size > 500_000 && size % 512 == 0, "{mode}");
            assert_eq!(read(&*h, 512 * 3, 512).await, vec![3; 512], "{mode}");
            assert_eq!(read(&*h, 512 * 5 - 2, 4).await, vec![4, 4, 5, 5], "{mode}");
            h.pwrite(&[9; 700], 1000, Flags::NONE).await.unwrap();
            let mut want = vec![1u8; 512];
            want.extend([2; 512]);
            want.extend([3; 512]);
            want[1000 - 512..1700 - 512].fill(9);
            assert_eq!(read(&*h, 512, 1536).await, want, "{mode}");
            h.zero(512, 2048, Flags::NONE).await.unwrap();
            assert_eq!(read(&*h, 2048, 512).await, vec![0; 512]);
            assert!(h.zero(512, 0, Flags::FAST_ZERO).await.is_err());
            // A second connection reads what the first wrote.
            let h2 = s.open(&ctx(2)).await.unwrap();
            assert_eq!(read(&*h2, 512, 1536).await, want, "{mode}");
            assert_eq!(h.block_size().unwrap().unwrap().minimum, 512);
            assert!(!h.caps().unwrap().extents);
        }
    }

    #[tokio::test]
    async fn luks_errors() {
        let mem = Mem::with(volume("xts-plain64", 64, "sha256", "secret", 1 << 20));
        let e = stack(vec![filter(&["passphrase=wrong"])], &mem)
            .open(&ctx(1))
            .await
            .err()
            .unwrap();
        assert!(e.msg.contains("passphrase is not correct"), "{}", e.msg);
        for (data, want) in [
            (vec![0u8; 1 << 20], "does not contain a LUKS header"),
            (vec![0u8; 4096], "too small"),
        ] {
            let e = stack(vec![filter(&["passphrase=x"])], &Mem::with(data))
                .open(&ctx(1))
                .await
                .err()
                .unwrap();
            assert!(e.msg.contains(want), "{}", e.msg);
        }
        let mut v2 = volume("xts-plain64", 64, "sha256", "secret", 1 << 20);
        v2[7] = 2;
        let e = stack(vec![filter(&["passphrase=x"])], &Mem::with(v2))
            .open(&ctx(1))
            .await
            .err()
            .unwrap();
        assert!(e.msg.contains("only supports LUKSv1"), "{}", e.msg);
        assert!(Spec::parse("aes", "ecb-plain", 32).is_err());
        assert!(Spec::parse("twofish", "xts-plain64", 64).is_err());
        assert!(Spec::parse("aes", "xts", 64).is_err());
        assert!(Spec::parse("aes", "cbc-essiv", 32).is_err());
        assert!(Spec::parse("aes", "xts-plain64", 16).is_err());
        assert!(create(&mut params(&[])).is_err());
    }

    #[test]
    fn luks_passphrase_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pw");
        std::fs::write(&p, "pw\n").unwrap();
        let ps = p.to_str().unwrap();
        create(&mut params(&[&format!("passphrase=+{ps}")])).unwrap();
        create(&mut params(&[&format!("passphrase-file={ps}")])).unwrap();
        assert!(create(&mut params(&["passphrase-file=/no/such/file"])).is_err());
    }
}
