//! Unit tests of the xz filter over an in-memory plugin: files built here
//! with liblzma's encoder and assembled into multi-block and multi-stream
//! files by our own index writer.

use std::sync::atomic::{AtomicUsize, Ordering};

use liblzma::stream::Check;
use libnbd::{Plugin, Stack};

use super::decode::tests::xz_one;
use super::index::{parse_footer, parse_index, round4, stream_footer, stream_header, write_vli};
use super::*;

/// A plugin serving bytes from memory, counting reads.
struct Mem {
    data: Arc<Vec<u8>>,
    reads: Arc<AtomicUsize>,
}

struct MemHandle {
    data: Arc<Vec<u8>>,
    reads: Arc<AtomicUsize>,
}

#[async_trait]
impl Plugin for Mem {
    async fn open(&self, _ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(MemHandle {
            data: self.data.clone(),
            reads: self.reads.clone(),
        }))
    }
}

#[async_trait]
impl Handle for MemHandle {
    fn size(&self) -> Result<u64> {
        Ok(self.data.len() as u64)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, _flags: Flags) -> Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let o = offset as usize;
        match self.data.get(o..o + buf.len()) {
            Some(d) => {
                buf.copy_from_slice(d);
                Ok(())
            }
            None => Err(Error::eio("read beyond the end")),
        }
    }
}

/// Disk-like data: runs of pseudo-random bytes, text and zeroes.
fn disk_like(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        let run = (rnd() % 200_000) as usize + 1;
        match rnd() % 3 {
            0 => v.extend((0..run).map(|_| rnd() as u8)),
            1 => v.extend(
                b"the quick brown fox jumps over the lazy dog 0123456789\n"
                    .iter()
                    .cycle()
                    .take(run),
            ),
            _ => v.resize(v.len() + run, 0),
        }
    }
    v.truncate(len);
    v
}

/// One stream whose blocks hold `parts` (as `xz --block-size` writes).
fn xz_stream(parts: &[&[u8]], check: Check) -> Vec<u8> {
    let mut out = Vec::new();
    let mut recs = Vec::new();
    let mut flags = [0, 0];
    for p in parts.iter().filter(|p| !p.is_empty()) {
        let s = xz_one(p, check);
        let (f, ilen) = parse_footer(&s[s.len() - 12..]).unwrap();
        flags = f;
        let r = parse_index(&s[s.len() - 12 - ilen as usize..s.len() - 12]).unwrap();
        out.extend_from_slice(&s[12..12 + round4(r[0].0) as usize]);
        recs.push(r[0]);
    }
    if parts.iter().all(|p| p.is_empty()) {
        return xz_one(&[], check);
    }
    let mut ix = vec![0u8];
    write_vli(&mut ix, recs.len() as u64);
    for (u, s) in &recs {
        write_vli(&mut ix, *u);
        write_vli(&mut ix, *s);
    }
    while ix.len() % 4 != 0 {
        ix.push(0);
    }
    let c = index::crc32(&ix);
    ix.extend_from_slice(&c.to_le_bytes());
    let mut file = stream_header(flags).to_vec();
    file.extend_from_slice(&out);
    file.extend_from_slice(&ix);
    file.extend_from_slice(&stream_footer(flags, ix.len()));
    file
}

fn blocks_of(data: &[u8], size: usize) -> Vec<&[u8]> {
    data.chunks(size).collect()
}

fn xz_filter(depth: usize, max_block: u64, spill_max: u64) -> Arc<XzFilter> {
    Arc::new(XzFilter {
        cfg: Config {
            max_block,
            depth,
            spill_max,
        },
        files: Mutex::new(HashMap::new()),
    })
}

fn filter(depth: usize, max_block: u64, spill_max: u64) -> Arc<dyn Filter> {
    xz_filter(depth, max_block, spill_max)
}

/// The filter `f` over `xz` in memory, and the count of reads of it.
fn stack(xz: Vec<u8>, f: Arc<dyn Filter>) -> (Stack, Arc<AtomicUsize>) {
    let reads = Arc::new(AtomicUsize::new(0));
    let stack = Stack {
        filters: vec![f],
        plugin: Arc::new(Mem {
            data: Arc::new(xz),
            reads: reads.clone(),
        }),
    };
    (stack, reads)
}

/// The state of the one file `f` has opened.
fn the_file(f: &XzFilter) -> Arc<XzFile> {
    f.files.lock().unwrap().values().next().unwrap().clone()
}

async fn open_with(xz: Vec<u8>, f: Arc<dyn Filter>) -> (Result<Box<dyn Handle>>, Arc<AtomicUsize>) {
    let (stack, reads) = stack(xz, f);
    (stack.open(&OpenContext::default()).await, reads)
}

async fn open(xz: Vec<u8>) -> Box<dyn Handle> {
    open_with(xz, filter(8, 512 << 20, 8 << 30))
        .await
        .0
        .unwrap()
}

async fn read(h: &dyn Handle, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    h.pread(&mut b, off, Flags::NONE).await?;
    Ok(b)
}

/// Random reads (and reads across block edges) compared with `data`.
async fn check_random(h: &dyn Handle, data: &[u8], n: usize, seed: u64) {
    let mut x = seed | 1;
    for k in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % 300_000) as usize + 1;
        let len = len.min(data.len());
        let off = ((x >> 20) as usize) % (data.len() - len + 1);
        let got = read(h, off as u64, len).await.unwrap();
        assert!(
            got == data[off..off + len],
            "read {k} at {off} len {len} differs"
        );
    }
}

async fn check_sequential(h: &dyn Handle, data: &[u8], step: usize) {
    let mut off = 0;
    while off < data.len() {
        let n = step.min(data.len() - off);
        let got = read(h, off as u64, n).await.unwrap();
        assert!(
            got == data[off..off + n],
            "sequential read at {off} differs"
        );
        off += n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_block_random_and_sequential() {
    let data = disk_like(5 << 20, 1);
    let xz = xz_stream(&blocks_of(&data, 256 << 10), Check::Crc64);
    let h = open(xz).await;
    assert_eq!(h.size().unwrap(), data.len() as u64);
    assert!(!h.caps().unwrap().write);
    check_random(&*h, &data, 200, 7).await;
    check_sequential(&*h, &data, 65536).await;
    // Reads spanning several blocks, and the last byte.
    assert_eq!(
        read(&*h, 200 << 10, 1 << 20).await.unwrap(),
        data[200 << 10..][..1 << 20]
    );
    let last = data.len() as u64 - 1;
    assert_eq!(read(&*h, last, 1).await.unwrap(), [data[last as usize]]);
    assert!(read(&*h, last, 2).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_reads_within_a_cached_block_only() {
    let data = disk_like(3 << 20, 12);
    let xz = xz_stream(&blocks_of(&data, 1 << 20), Check::Crc64);
    let h = open(xz).await;
    // Inside the second block: part of the cached block itself.
    let at = (1 << 20) + 4096;
    let s = h.pread_shared(65536, at as u64, Flags::NONE).await.unwrap();
    assert!(*s.expect("a cached block's") == data[at..][..65536]);
    // The last bytes of the export.
    let at = data.len() - 100;
    let s = h.pread_shared(100, at as u64, Flags::NONE).await.unwrap();
    assert!(*s.expect("a cached block's") == data[at..]);
    // Across two blocks: not one block's bytes, so read as usual.
    let across = h.pread_shared(8192, (1 << 20) - 4096, Flags::NONE).await;
    assert!(across.unwrap().is_none());

    // A single-block file is spilled, not cached: never shared.
    let data = disk_like(6 << 20, 13);
    let h = open(xz_one(&data, Check::Crc64)).await;
    assert!(h
        .pread_shared(4096, 0, Flags::NONE)
        .await
        .unwrap()
        .is_none());
    assert_eq!(read(&*h, 0, 4096).await.unwrap(), data[..4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_stream_with_padding_and_checks() {
    let a = disk_like(700_000, 2);
    let b = disk_like(900_000, 3);
    let c = disk_like(100_000, 4);
    let mut xz = xz_stream(&blocks_of(&a, 200_000), Check::Crc32);
    xz.extend_from_slice(&[0u8; 8]);
    xz.extend_from_slice(&xz_stream(&[], Check::None));
    xz.extend_from_slice(&xz_stream(&blocks_of(&b, 300_000), Check::Sha256));
    xz.extend_from_slice(&[0u8; 4]);
    xz.extend_from_slice(&xz_stream(&[&c], Check::None));
    xz.extend_from_slice(&[0u8; 4096 + 12]);
    let all: Vec<u8> = [a, b, c].concat();
    let h = open(xz).await;
    assert_eq!(h.size().unwrap(), all.len() as u64);
    check_random(&*h, &all, 100, 9).await;
    check_sequential(&*h, &all, 100_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_block_is_spilled_and_decoded_once() {
    let data = disk_like(6 << 20, 5);
    let xz = xz_one(&data, Check::Crc64);
    let f = filter(8, 512 << 20, 8 << 30);
    let (h, reads) = open_with(xz.clone(), f).await;
    let h = h.unwrap();
    assert_eq!(h.size().unwrap(), data.len() as u64);
    // A read near the end, then random reads: the block is decoded once.
    let end = data.len() as u64 - 10;
    assert_eq!(read(&*h, end, 10).await.unwrap(), data[end as usize..]);
    check_random(&*h, &data, 200, 11).await;
    check_sequential(&*h, &data, 1 << 20).await;
    // Compressed bytes read: the index probes plus one pass over the data.
    let n = reads.load(Ordering::Relaxed);
    assert!(n < 16 + xz.len() / (2 << 20) * 2, "{n} reads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_block_ending_in_zeroes() {
    // The last chunks are holes in the spill file: they read as zeroes.
    let mut data = disk_like(3 << 20, 12);
    data.resize((6 << 20) + 1000, 0);
    let h = open(xz_one(&data, Check::Crc64)).await;
    let end = data.len() as u64 - 5000;
    assert_eq!(read(&*h, end, 5000).await.unwrap(), data[end as usize..]);
    check_random(&*h, &data, 50, 19).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spill_eviction_redecodes_correctly() {
    // Data with no zero runs, so every chunk is stored; a 3 MiB spill.
    let data: Vec<u8> = disk_like(8 << 20, 6).iter().map(|b| b | 1).collect();
    let xz = xz_one(&data, Check::Crc32);
    let (h, _) = open_with(xz, filter(8, 512 << 20, 3 << 20)).await;
    let h = h.unwrap();
    for off in [7u64 << 20, 0, 6 << 20, 1 << 20, 5 << 20, 0] {
        assert_eq!(
            read(&*h, off, 300_000).await.unwrap(),
            data[off as usize..][..300_000]
        );
    }
    check_random(&*h, &data, 30, 13).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_blocks_spill_beside_memory_blocks() {
    // xz-max-block=1M: the 3 MiB blocks spill, the small last one does not.
    let data = disk_like((9 << 20) + 5000, 8);
    let xz = xz_stream(&blocks_of(&data, 3 << 20), Check::Crc64);
    let (h, _) = open_with(xz, filter(4, 1 << 20, 8 << 30)).await;
    let h = h.unwrap();
    check_random(&*h, &data, 100, 17).await;
    check_sequential(&*h, &data, 256 << 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_an_error_never_wrong_data() {
    let data = disk_like(2 << 20, 10);
    let good = xz_stream(&blocks_of(&data, 512 << 10), Check::Crc64);
    // Flip a byte inside the second block's compressed data.
    let h = open(good.clone()).await;
    let b1 = h.size().unwrap(); // sanity
    assert_eq!(b1, data.len() as u64);
    drop(h);
    let mut bad = good.clone();
    let ix = {
        let (h, _) = open_with(good.clone(), filter(8, 512 << 20, 8 << 30)).await;
        drop(h);
        // Find block 1 by parsing the index ourselves.
        let (_, ilen) = parse_footer(&good[good.len() - 12..]).unwrap();
        parse_index(&good[good.len() - 12 - ilen as usize..good.len() - 12]).unwrap()
    };
    let b1_start = 12 + round4(ix[0].0) as usize;
    bad[b1_start + ix[1].0 as usize / 2] ^= 0x55;
    let h = open(bad).await;
    assert_eq!(read(&*h, 0, 1000).await.unwrap(), data[..1000]);
    let e = read(&*h, (512 << 10) + 10, 1000).await.unwrap_err();
    assert_eq!(e.errno, libnbd::protocol::errno::EIO);
    assert!(e.msg.contains("xz: block 1"), "{}", e.msg);
    // The other blocks are still served.
    assert_eq!(
        read(&*h, 3 << 19, 1000).await.unwrap(),
        data[3 << 19..][..1000]
    );

    // A corrupt single (spilled) block never completes successfully.
    let mut bad = xz_one(&data, Check::Crc64);
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    let h = open(bad).await;
    let mut buf = vec![0u8; data.len()];
    assert!(
        h.pread(&mut buf, 0, Flags::NONE).await.is_err() || buf != data || {
            // The data matched: the damage must then be caught by the check.
            read(&*h, 0, data.len()).await.is_err()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_xz_or_truncated_fails_at_open() {
    let f = || filter(8, 512 << 20, 8 << 30);
    let e = open_with(vec![7u8; 4096], f()).await.0.err().unwrap();
    assert!(e.msg.contains("xz"), "{}", e.msg);
    let xz = xz_one(&disk_like(100_000, 1), Check::Crc64);
    let e = open_with(xz[..xz.len() - 4].to_vec(), f())
        .await
        .0
        .err()
        .unwrap();
    assert!(e.msg.contains("xz"), "{}", e.msg);
    let e = open_with(xz[4..].to_vec(), f()).await.0.err().unwrap();
    assert!(e.msg.contains("xz"), "{}", e.msg);
    assert!(open_with(vec![], f()).await.0.is_err());
}

#[test]
fn params() {
    let mut p = Params::parse(&["xz-max-depth=3", "xz-max-block=1M", "other=1"], None).unwrap();
    assert!(create(&mut p).is_ok());
    assert_eq!(p.items(), &[("other".to_string(), "1".to_string())]);
    for bad in [
        "xz-max-depth=0",
        "xz-max-depth=x",
        "xz-max-block=0",
        "xz-spill-max=1M",
    ] {
        let mut p = Params::parse(&[bad], None).unwrap();
        assert!(create(&mut p).is_err(), "{bad}");
    }
}

/// Several connections reading one image in turn, as nbdcopy's four do,
/// share the blocks they pass: the cache stays near what one sequential
/// reader needs (`xz-max-depth` if smaller) instead of growing to
/// `xz-max-depth` per connection, and every read is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_readers_keep_the_cache_at_what_they_need() {
    for depth in [4, 8, 32] {
        let data = disk_like(6 << 20, 21);
        let xz = xz_stream(&blocks_of(&data, 256 << 10), Check::Crc64);
        let f = xz_filter(depth, 512 << 20, 8 << 30);
        let (stack, _) = stack(xz, f.clone());
        let mut handles = Vec::new();
        for _ in 0..4 {
            handles.push(stack.open(&OpenContext::default()).await.unwrap());
        }
        let file = the_file(&f);
        let need = file.sequential_need();
        assert_eq!(need, depth.min(file.ahead + 3));
        assert!(
            need < 8 || file.ahead > 4,
            "{need} blocks for {} ahead",
            file.ahead
        );
        let (mut most, step) = (0, 64 << 10);
        for (k, off) in (0..data.len()).step_by(step).enumerate() {
            let got = read(&*handles[k % 4], off as u64, step).await.unwrap();
            assert!(got == data[off..off + step], "read at {off} differs");
            most = most.max(file.lru.lock().unwrap().map.len());
        }
        assert_eq!(file.capacity(), 4 * depth);
        assert!(
            most <= need + 1,
            "{most} blocks cached, for xz-max-depth={depth} ({need} needed)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_buffers_go_back_to_the_pool_when_replies_outlive_the_cache() {
    let data = disk_like(4 << 20, 22);
    let xz = xz_stream(&blocks_of(&data, 1 << 20), Check::Crc64);
    let f = xz_filter(1, 512 << 20, 8 << 30);
    let (h, _) = open_with(xz, f.clone()).await;
    let h = h.unwrap();
    let file = the_file(&f);
    // A reply still being sent holds the first block...
    let held = h.pread_shared(4096, 0, Flags::NONE).await.unwrap().unwrap();
    assert!(*held == data[..4096]);
    // ... while a read at the far end drops it from the cache.
    let far = data.len() - 4096;
    assert_eq!(read(&*h, far as u64, 4096).await.unwrap(), data[far..]);
    assert!(!file.lru.lock().unwrap().map.contains_key(&0));
    let before = file.spare.items.lock().unwrap().len();
    drop(held);
    let after = file.spare.items.lock().unwrap();
    assert_eq!(after.len(), before + 1, "the block's buffer was not kept");
    assert!(after.iter().all(|b| b.capacity() >= 1 << 20));
}

/// Connections each copying their own region in turn, as libnbd's
/// nbdcopy does (a thread and a connection per 128M): one's reads at the
/// start of its region do not mark the end of the region before, still
/// to be read by another, as passed, nor is the next region's start
/// decoded again ahead of the first connection once the other has read
/// it: every block is fetched and decoded once, and every read is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reading_their_own_regions_decode_each_block_once() {
    let bs = 256 << 10;
    let data = disk_like(24 * bs, 23);
    let xz = xz_stream(&blocks_of(&data, bs), Check::Crc64);
    let f = xz_filter(8, 512 << 20, 8 << 30);
    let (stack, reads) = stack(xz, f.clone());
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(stack.open(&OpenContext::default()).await.unwrap());
    }
    let opened = reads.load(Ordering::Relaxed);
    // Connection c reads blocks 8c..8c+8, the second one far ahead of
    // the first, the third just behind it: each step, connection 1
    // reads 64K, then 2 and 3 read 128K each.
    let region = 8 * bs;
    let (mut at, step) = ([0, region, 2 * region], 64 << 10);
    while at[0] < region {
        for (c, n) in [(0, 1), (1, 2), (2, 2)] {
            for _ in 0..n {
                if at[c] < (c + 1) * region {
                    let off = at[c];
                    let got = read(&*handles[c], off as u64, step).await.unwrap();
                    assert!(got == data[off..off + step], "read at {off} differs");
                    at[c] += step;
                }
            }
        }
        // Let the blocks decoded ahead land.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(
        reads.load(Ordering::Relaxed) - opened,
        24,
        "24 blocks, each fetched once"
    );
    // Reading the image again from the start: the blocks passed and
    // dropped are decoded ahead of the new reader all the same.
    let file = the_file(&f);
    assert!(file.lru.lock().unwrap().gone.iter().any(|g| *g));
    let h = stack.open(&OpenContext::default()).await.unwrap();
    for b in 0..8 {
        for off in (b * bs..(b + 1) * bs).step_by(step) {
            assert_eq!(
                read(&*h, off as u64, step).await.unwrap(),
                data[off..off + step]
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let lru = file.lru.lock().unwrap();
        assert!(
            lru.map.contains_key(&(b + 1)),
            "block {} is decoded ahead of a reader at block {b}: {:?} {:?}",
            b + 1,
            lru.map.keys().collect::<Vec<_>>(),
            lru.gone
        );
    }
}

#[tokio::test]
async fn a_huge_index_is_refused_before_it_is_read() {
    // A footer claiming a 1 GiB index (a crafted or sparse file could hold
    // one): refused with a message, nothing allocated for it.
    let flags = [0, 4];
    let mut xz = stream_header(flags).to_vec();
    xz.extend_from_slice(&stream_footer(flags, 1 << 30));
    let (h, reads) = open_with(xz, filter(8, 512 << 20, 8 << 30)).await;
    let e = h.err().expect("a 1 GiB index was taken");
    assert!(e.msg.contains("more than the 256 MiB"), "{}", e.msg);
    assert!(reads.load(Ordering::Relaxed) <= 3);
}
