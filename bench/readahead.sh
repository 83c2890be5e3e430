#!/usr/bin/env bash
# The readahead filter: our nbdkit with and without --filter=readahead
# over a slow layer (--filter=delay rdelay=..., which makes every read of
# the plugin wait, like a distant HTTP server), side by side in one run:
#  1. sequential copies with libnbd's nbdcopy to null: (one connection
#     with 4 requests in flight, and nbdcopy's defaults), hyperfine;
#  2. fio random 4K reads at queue depth 8 (IOPS), which readahead must
#     not slow down;
# and, for reference, upstream nbdkit's recommended stack
# (--filter=readahead --filter=cache) on the first copy.
# Prints ratios: for copies, time without / time with readahead (> 1:
# readahead helps); for fio, IOPS with / without (about 1: no harm).
#
# Usage: bench/readahead.sh            (builds the release binary first)
#        NBDKIT=path/to/nbdkit bench/readahead.sh   (use that binary)
# Knobs: RDELAY (10ms), SIZE (256M), RUNS (5), FIO_TIME (10 seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NBDKIT:-}" ]; then
  cargo build --release --bin nbdkit >&2
  NBDKIT=$PWD/target/release/nbdkit
fi
RDELAY=${RDELAY:-10ms}
SIZE=${SIZE:-256M}
RUNS=${RUNS:-5}
FIO_TIME=${FIO_TIME:-10}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# The slow plugin: a pattern disk (all data, no extents) behind a delay.
slow="--filter=delay pattern $SIZE rdelay=$RDELAY"

ratio() { # json-file name-without name-with
  python3 - "$@" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
a, b = sys.argv[2], sys.argv[3]
line = f"  {a} {r[a]:.3f}s  {b} {r[b]:.3f}s  speed-up {r[a]/r[b]:.2f}x"
if "upstream-readahead+cache" in r:
    u = r["upstream-readahead+cache"]
    line += f"  (upstream readahead+cache {u:.3f}s: ours is {u/r[b]:.2f}x faster)"
print(line)
PY
}

echo "== sequential nbdcopy, 1 connection, 4 requests in flight, $SIZE, rdelay=$RDELAY"
copy1="nbdcopy --connections=1 --requests=4 \$uri null:"
hyperfine -N -w 1 -r "$RUNS" --export-json "$out/seq1.json" \
  -n without "$NBDKIT -U - $slow --run '$copy1'" \
  -n with "$NBDKIT -U - --filter=readahead $slow --run '$copy1'" \
  -n upstream-readahead+cache "nbdkit -U - --filter=readahead --filter=cache $slow --run '$copy1'" >&2
ratio "$out/seq1.json" without with

echo "== sequential nbdcopy, default settings, $SIZE, rdelay=$RDELAY"
copy2="nbdcopy \$uri null:"
hyperfine -N -w 1 -r "$RUNS" --export-json "$out/seq2.json" \
  -n without "$NBDKIT -U - $slow --run '$copy2'" \
  -n with "$NBDKIT -U - --filter=readahead $slow --run '$copy2'" >&2
ratio "$out/seq2.json" without with

echo "== fio random 4K reads, QD8, ${FIO_TIME}s, rdelay=$RDELAY"
fio_iops() { # extra-filters
  "$NBDKIT" -U - $1 --filter=delay pattern 1G rdelay="$RDELAY" --run "
    fio --name=rr --ioengine=nbd --uri=\"\$uri\" --rw=randread --bs=4k --iodepth=8 \
        --size=1G --runtime=$FIO_TIME --time_based --output-format=json" |
    python3 -c 'import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index("{"):])["jobs"][0]["read"]["iops"])'
}
for round in 1 2; do
  without=$(fio_iops "")
  with=$(fio_iops "--filter=readahead")
  python3 -c "print(f'  round $round: without {float($without):.0f} IOPS  with {float($with):.0f} IOPS  ratio {float($with)/float($without):.2f}x')"
done
