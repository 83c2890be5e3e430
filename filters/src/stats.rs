//! # stats: count the requests and write a summary at exit
//!
//! Every successful read, write, trim, zero, extents, cache and flush is
//! counted with its size and the time the layers below took. When nbdkit
//! exits cleanly the totals are written to the stats file, in upstream
//! nbdkit's format: the elapsed time and overall rate, then per operation
//! the count, time spent, bytes, rate while busy and rate over the run,
//! and (unless `statsthreshold=0`) a breakdown of the request sizes (in
//! bits: "12 bits" means 4096 to 8191 bytes) and of the alignment of
//! their offsets (the number of trailing zero bits; offset 0 counts as
//! aligned to everything).
//!
//! ```text
//! nbdkit --filter=stats memory 1G statsfile=/tmp/stats.txt
//! ```
//!
//! ## Parameters
//!
//! - `statsfile=FILE` (required): where to write the statistics. It is
//!   opened (created or truncated) when nbdkit starts.
//! - `statsappend=true`: append to the file instead of replacing it.
//! - `statsthreshold=PERCENTILE` (0 to 100, default 95): show the size
//!   classes that make up this percentage of the requests, the rest as
//!   "other sizes"; 0 turns the breakdown off.
//!
//! One difference from upstream: the "other sizes" line counts the bytes
//! of those requests only, where nbdkit 1.32 repeats the operation's
//! total.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use libnbd::{
    ConfigError, ConfigResult, Extents, Filter, FilterEntry, Flags, Handle, Next, OpenContext,
    Params, Result,
};

/// Registry entry.
pub const ENTRY: FilterEntry = FilterEntry {
    name: "stats",
    help: "\
statsfile=<FILE>    (required) The file to place the log in.
statsappend=<BOOL>  True to append to the log (default false).
statsthreshold=<PERCENTILE>  Size breakdown covers this share (default 95).
",
    create,
};

fn create(p: &mut Params) -> ConfigResult<Arc<dyn Filter>> {
    let append = p.take_bool("statsappend")?.unwrap_or(false);
    let threshold: u32 = p.take_parsed("statsthreshold")?.unwrap_or(95);
    if threshold > 100 {
        return Err(ConfigError::new(
            "statsthreshold must be between 0 and 100 (percent)",
        ));
    }
    let path = p
        .take("statsfile")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ConfigError::new("stats filter requires statsfile parameter"))?;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(append)
        .truncate(!append)
        .open(&path)
        .map_err(|e| ConfigError::new(format!("open: {path}: {e}")))?;
    Ok(Arc::new(StatsFilter {
        shared: Arc::new(Shared {
            stats: Mutex::new(Stats::default()),
            threshold: threshold as f64 / 100.0,
            start: Instant::now(),
            file: Mutex::new(Some(file)),
        }),
    }))
}

/// The operations, in the order they are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read = 0,
    Write,
    Trim,
    Zero,
    Extents,
    Cache,
    Flush,
}

const OPS: [Op; 7] = [
    Op::Read,
    Op::Write,
    Op::Trim,
    Op::Zero,
    Op::Extents,
    Op::Cache,
    Op::Flush,
];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Trim => "trim",
            Op::Zero => "zero",
            Op::Extents => "extents",
            Op::Cache => "cache",
            Op::Flush => "flush",
        }
    }
    fn has_histogram(self) -> bool {
        self != Op::Flush
    }
}

/// Counters of one operation.
#[derive(Debug, Default, Clone)]
struct OpStat {
    ops: u64,
    bytes: u64,
    usecs: u64,
    /// (size bits, offset alignment or -1 for offset 0) -> (requests,
    /// bytes).
    hist: HashMap<(u32, i32), (u64, u64)>,
}

#[derive(Debug, Default)]
struct Stats {
    ops: [OpStat; 7],
}

struct Shared {
    stats: Mutex<Stats>,
    /// Fraction of requests the size breakdown covers (0: none).
    threshold: f64,
    start: Instant,
    file: Mutex<Option<File>>,
}

impl Shared {
    fn record(&self, op: Op, count: u64, offset: u64, t: Instant) {
        let usecs = t.elapsed().as_micros() as u64;
        let mut s = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let st = &mut s.ops[op as usize];
        st.ops += 1;
        st.bytes += count;
        st.usecs += usecs;
        if self.threshold > 0.0 && op.has_histogram() && count > 0 {
            let bits = 63 - count.leading_zeros();
            let align = if offset == 0 {
                -1
            } else {
                offset.trailing_zeros() as i32
            };
            let e = st.hist.entry((bits, align)).or_insert((0, 0));
            e.0 += 1;
            e.1 += count;
        }
    }
}

struct StatsFilter {
    shared: Arc<Shared>,
}

#[async_trait]
impl Filter for StatsFilter {
    fn passes_meta_contexts(&self) -> bool {
        // Same offsets and data: the plugin's other contexts stay true.
        true
    }
    async fn open(&self, next: Next<'_>, ctx: &OpenContext) -> Result<Box<dyn Handle>> {
        Ok(Box::new(StatsHandle {
            next: next.open(ctx).await?,
            shared: self.shared.clone(),
        }))
    }

    fn unload(&self) {
        let usecs = self.shared.start.elapsed().as_micros() as u64;
        let text = {
            let s = self
                .shared
                .stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            format_stats(&s, usecs.max(1), self.shared.threshold)
        };
        if let Some(mut f) = self
            .shared
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            if let Err(e) = f.write_all(text.as_bytes()).and_then(|_| f.flush()) {
                libnbd::elog!("nbdkit: stats: writing the stats file: {e}");
            }
        }
    }
}

/// Bytes as upstream prints them.
fn human_size(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if bytes < 1 << 10 {
        format!("{bytes} bytes")
    } else if bytes < 1 << 20 {
        format!("{:.2} KiB", b / KIB)
    } else if bytes < 1 << 30 {
        format!("{:.2} MiB", b / KIB / KIB)
    } else {
        format!("{:.2} GiB", b / KIB / KIB / KIB)
    }
}

/// A rate in bytes per second, or "(n/a)" over no time at all.
fn human_rate(bytes: u64, usecs: u64) -> String {
    if usecs == 0 {
        return "(n/a)".to_string();
    }
    human_size((bytes as f64 / (usecs as f64 / 1e6)) as u64)
}

fn format_stats(s: &Stats, usecs: u64, threshold: f64) -> String {
    let mut out = String::new();
    let counted = |o: Op| !matches!(o, Op::Cache);
    let ops: u64 = OPS
        .iter()
        .filter(|o| counted(**o))
        .map(|o| s.ops[*o as usize].ops)
        .sum();
    let bytes: u64 = [Op::Read, Op::Write, Op::Trim, Op::Zero]
        .iter()
        .map(|o| s.ops[*o as usize].bytes)
        .sum();
    out += &format!(
        "total: {ops} ops, {:.6} s, {}, {}/s\n",
        usecs as f64 / 1e6,
        human_size(bytes),
        human_rate(bytes, usecs)
    );
    for op in OPS {
        let st = &s.ops[op as usize];
        if st.ops == 0 {
            continue;
        }
        out += &format!(
            "{}: {} ops, {:.6} s, {}, {}/s op, {}/s total\n",
            op.name(),
            st.ops,
            st.usecs as f64 / 1e6,
            human_size(st.bytes),
            human_rate(st.bytes, st.usecs),
            human_rate(st.bytes, usecs)
        );
        if threshold > 0.0 && op.has_histogram() {
            out += "  Request size and alignment breakdown:\n";
            format_histogram(&mut out, &st.hist, threshold);
            out += "\n";
        }
    }
    out
}

/// The size classes, most requested first, until `threshold` of the
/// requests are shown; each with its alignment breakdown.
fn format_histogram(out: &mut String, hist: &HashMap<(u32, i32), (u64, u64)>, threshold: f64) {
    // Size class -> (alignment -> requests), and bytes per class.
    let mut classes: BTreeMap<u32, BTreeMap<i32, u64>> = BTreeMap::new();
    let mut class_bytes: HashMap<u32, u64> = HashMap::new();
    for (&(bits, align), &(n, b)) in hist {
        *classes.entry(bits).or_default().entry(align).or_insert(0) += n;
        *class_bytes.entry(bits).or_insert(0) += b;
    }
    let total: u64 = hist.values().map(|v| v.0).sum();
    if total == 0 {
        return;
    }
    // Most requested first (ties: smaller sizes first).
    let mut order: Vec<(u32, u64)> = classes
        .iter()
        .map(|(b, m)| (*b, m.values().sum()))
        .collect();
    order.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let to_print = (threshold * total as f64) as u64;
    let mut printed = 0u64;
    for (i, &(bits, reqs)) in order.iter().enumerate() {
        if printed >= to_print {
            let rest = total - printed;
            let rest_bytes: u64 = order[i..].iter().map(|(b, _)| class_bytes[b]).sum();
            *out += &format!(
                "    other sizes: {:4.1}% ({rest} reqs, {} total)\n",
                rest as f64 * 100.0 / total as f64,
                human_size(rest_bytes)
            );
            break;
        }
        *out += &format!(
            "    {bits:2} bits: {:4.1}% ({reqs} reqs, {} total)\n",
            reqs as f64 * 100.0 / total as f64,
            human_size(class_bytes[&bits])
        );
        printed += reqs;
        format_alignment(out, &classes[&bits], reqs, threshold);
    }
}

/// For each alignment present, the requests aligned at least that well,
/// until what is left is under the threshold's complement.
fn format_alignment(out: &mut String, aligns: &BTreeMap<i32, u64>, total: u64, threshold: f64) {
    let any = aligns.get(&-1).copied().unwrap_or(0);
    let exact: Vec<(i32, u64)> = aligns
        .iter()
        .filter(|(a, _)| **a >= 0)
        .map(|(a, n)| (*a, *n))
        .collect();
    let cutoff = ((1.0 - threshold) * total as f64) as u64;
    for (i, &(bits, _)) in exact.iter().enumerate() {
        let at_least: u64 = exact[i..].iter().map(|(_, n)| n).sum::<u64>() + any;
        if at_least < cutoff {
            *out += &format!(
                "         {bits:2}+ bit-aligned: {:4.1}% ({at_least})\n",
                at_least as f64 * 100.0 / total as f64
            );
            break;
        }
        *out += &format!(
            "         {bits:2} bit aligned: {:5.1}% ({at_least})\n",
            at_least as f64 * 100.0 / total as f64
        );
    }
}

struct StatsHandle {
    next: Box<dyn Handle>,
    shared: Arc<Shared>,
}

#[async_trait]
impl Handle for StatsHandle {
    fn next(&self) -> Option<&dyn Handle> {
        Some(&*self.next)
    }
    async fn pread(&self, buf: &mut [u8], offset: u64, flags: Flags) -> Result<()> {
        let t = Instant::now();
        self.next.pread(buf, offset, flags).await?;
        self.shared.record(Op::Read, buf.len() as u64, offset, t);
        Ok(())
    }
    async fn pwrite(&self, buf: &[u8], offset: u64, flags: Flags) -> Result<()> {
        let t = Instant::now();
        self.next.pwrite(buf, offset, flags).await?;
        self.shared.record(Op::Write, buf.len() as u64, offset, t);
        Ok(())
    }
    async fn flush(&self, flags: Flags) -> Result<()> {
        let t = Instant::now();
        self.next.flush(flags).await?;
        self.shared.record(Op::Flush, 0, 0, t);
        Ok(())
    }
    async fn trim(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let t = Instant::now();
        self.next.trim(count, offset, flags).await?;
        self.shared.record(Op::Trim, count, offset, t);
        Ok(())
    }
    async fn zero(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let t = Instant::now();
        self.next.zero(count, offset, flags).await?;
        self.shared.record(Op::Zero, count, offset, t);
        Ok(())
    }
    async fn extents(
        &self,
        count: u64,
        offset: u64,
        flags: Flags,
        ext: &mut Extents,
    ) -> Result<()> {
        let t = Instant::now();
        self.next.extents(count, offset, flags, ext).await?;
        self.shared.record(Op::Extents, count, offset, t);
        Ok(())
    }
    async fn cache(&self, count: u64, offset: u64, flags: Flags) -> Result<()> {
        let t = Instant::now();
        self.next.cache(count, offset, flags).await?;
        self.shared.record(Op::Cache, count, offset, t);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::mem_stack;

    fn shared(threshold: f64) -> Shared {
        Shared {
            stats: Mutex::new(Stats::default()),
            threshold,
            start: Instant::now(),
            file: Mutex::new(None),
        }
    }

    #[test]
    fn breakdown_matches_upstream() {
        // The requests of a run of upstream nbdkit 1.32, whose output is
        // below (but for "other sizes", where upstream repeats the total).
        let s = shared(0.95);
        let t = Instant::now();
        for i in 1..=20 {
            s.record(Op::Read, 4096, i * 4096, t);
        }
        for i in 0..5 {
            s.record(Op::Read, 512, 512 * (2 * i + 1), t);
        }
        s.record(Op::Read, 3892, 8192, t);
        s.record(Op::Read, 65536, 1 << 20, t);
        s.record(Op::Read, 65536, 3 << 20, t);
        for _ in 0..3 {
            s.record(Op::Write, 4096, 0, t);
        }
        let mut out = String::new();
        let st = s
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        format_histogram(&mut out, &st.ops[Op::Read as usize].hist, 0.95);
        assert_eq!(
            out,
            "    12 bits: 71.4% (20 reqs, 80.00 KiB total)
         12 bit aligned: 100.0% (20)
         13 bit aligned:  50.0% (10)
         14 bit aligned:  25.0% (5)
         15 bit aligned:  10.0% (2)
         16 bit aligned:   5.0% (1)
     9 bits: 17.9% (5 reqs, 2.50 KiB total)
          9 bit aligned: 100.0% (5)
    16 bits:  7.1% (2 reqs, 128.00 KiB total)
         20 bit aligned: 100.0% (2)
    other sizes:  3.6% (1 reqs, 3.80 KiB total)
"
        );
        let mut out = String::new();
        format_histogram(&mut out, &st.ops[Op::Write as usize].hist, 0.95);
        assert_eq!(out, "    12 bits: 100.0% (3 reqs, 12.00 KiB total)\n");
    }

    #[test]
    fn rare_alignments_are_folded() {
        let s = shared(0.95);
        let t = Instant::now();
        // 100 requests at 4K alignment, 2 at 64K: 2 < 5% of 102.
        for i in 0..100u64 {
            s.record(Op::Write, 4096, (2 * i + 1) * 4096, t);
        }
        s.record(Op::Write, 4096, 65536, t);
        s.record(Op::Write, 4096, 3 * 65536, t);
        let mut out = String::new();
        format_histogram(
            &mut out,
            &s.stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .ops[1]
                .hist,
            0.95,
        );
        assert_eq!(
            out,
            "    12 bits: 100.0% (102 reqs, 408.00 KiB total)
         12 bit aligned: 100.0% (102)
         16+ bit-aligned:  2.0% (2)
"
        );
    }

    #[test]
    fn summary_lines() {
        let s = shared(0.95);
        let t = Instant::now();
        s.record(Op::Read, 512, 1024, t);
        s.record(Op::Read, 512, 3072, t);
        s.record(Op::Flush, 0, 0, t);
        s.record(Op::Cache, 4096, 0, t);
        let text = format_stats(
            &s.stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            2_000_000,
            0.95,
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "total: 3 ops, 2.000000 s, 1.00 KiB, 512 bytes/s");
        assert!(lines[1].starts_with("read: 2 ops, "), "{text}");
        assert!(lines[1].ends_with(", 512 bytes/s total"), "{text}");
        assert_eq!(lines[2], "  Request size and alignment breakdown:");
        assert_eq!(lines[3], "     9 bits: 100.0% (2 reqs, 1.00 KiB total)");
        assert_eq!(lines[4], "         10 bit aligned: 100.0% (2)");
        assert_eq!(lines[5], "");
        // A single request is "other sizes", as upstream prints it.
        assert!(lines[6].starts_with("cache: 1 ops"));
        assert_eq!(lines[8], "    other sizes: 100.0% (1 reqs, 4.00 KiB total)");
        assert!(lines.last().unwrap().starts_with("flush: 1 ops, "));
        assert!(text.ends_with(" total\n"));
        // No breakdown at all with a zero threshold.
        let text = format_stats(
            &s.stats
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            2_000_000,
            0.0,
        );
        assert!(!text.contains("breakdown"));
        assert_eq!(human_size(1536), "1.50 KiB");
        assert_eq!(human_size(3 << 30), "3.00 GiB");
        assert_eq!(human_rate(10, 0), "(n/a)");
    }

    #[tokio::test]
    async fn counts_and_writes_the_file_at_unload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.txt");
        std::fs::write(&path, "old\n").unwrap();
        let arg = format!("statsfile={}", path.display());
        let f =
            create(&mut Params::parse(&[arg.as_str(), "statsappend=true"], None).unwrap()).unwrap();
        let (stack, _, _) = mem_stack(f.clone(), 1 << 20);
        let h = stack.open(&OpenContext::default()).await.unwrap();
        let mut b = vec![0u8; 4096];
        h.pread(&mut b, 0, Flags::NONE).await.unwrap();
        h.pread(&mut b, 4096, Flags::NONE).await.unwrap();
        h.pwrite(&b[..512], 512, Flags::NONE).await.unwrap();
        // Failed requests are not counted.
        assert!(h.pread(&mut b, (1 << 20) - 10, Flags::NONE).await.is_err());
        stack.unload();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("old\ntotal: 3 ops, "), "{text}");
        assert!(text.contains("\nread: 2 ops, "), "{text}");
        assert!(text.contains(", 8.00 KiB, "), "{text}");
        assert!(text.contains("\nwrite: 1 ops, "), "{text}");
        assert!(create(&mut Params::parse(&["statsappend=1"], None).unwrap()).is_err());
        assert!(
            create(&mut Params::parse(&[arg.as_str(), "statsthreshold=101"], None).unwrap())
                .is_err()
        );
    }
}
