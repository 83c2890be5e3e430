#!/usr/bin/env bash
# Our nbdkit against upstream nbdkit, side by side in one run, same client:
#  1. libnbd's nbdcopy from `pattern 4G` to null:
#  2. fio random 4K reads at queue depth 32 from `memory` (prefilled)
#  3. server memory under a flood of 32 MiB writes (RSS before/after)
# Prints the ratios (upstream time / our time: > 1 means ours is faster).
#
# Usage: bench/server.sh   (builds the release binaries first)
set -euo pipefail
cd "$(dirname "$0")/.."
# NBDKIT=path uses an existing binary of ours instead of building one.
if [ -z "${NBDKIT:-}" ]; then
  cargo build --release --bin nbdkit >&2
  NBDKIT=$PWD/target/release/nbdkit
fi
OURS=$NBDKIT
RUNS=${RUNS:-5}
SIZE=${SIZE:-4G}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "== nbdcopy pattern $SIZE -> null: ($RUNS runs each)"
hyperfine -N -w 1 -r "$RUNS" --export-json "$out/copy.json" \
  -n upstream "nbdkit -U - pattern $SIZE --run 'nbdcopy \$uri null:'" \
  -n ours "$OURS -U - pattern $SIZE --run 'nbdcopy \$uri null:'" >&2
python3 - "$out/copy.json" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
print(f"nbdcopy pattern->null: upstream {r['upstream']:.3f}s ours {r['ours']:.3f}s ratio {r['upstream']/r['ours']:.2f}x")
PY

echo "== fio randread 4k QD32 from memory 1G"
fio_iops() {
  local srv=$1
  "$srv" -U - memory 1G --run "
    fio --name=fill --ioengine=nbd --uri=\"\$uri\" --rw=write --bs=1M --size=1G --iodepth=8 >/dev/null &&
    fio --name=rr --ioengine=nbd --uri=\"\$uri\" --rw=randread --bs=4k --iodepth=32 --size=1G \
        --runtime=${FIO_TIME:-10} --time_based --output-format=json" |
    python3 -c 'import json,sys; s=sys.stdin.read(); print(json.loads(s[s.index("{"):])["jobs"][0]["read"]["iops"])'
}
for round in 1 2; do
  up=$(fio_iops nbdkit); ours=$(fio_iops "$OURS")
  python3 -c "print(f'fio randread round $round: upstream {float($up):.0f} IOPS ours {float($ours):.0f} IOPS ratio {float($ours)/float($up):.2f}x')"
done

echo "== memory under a flood of 32 MiB writes (64 in flight, 4 rounds)"
flood='
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
buf = nbd.Buffer.from_bytearray(bytearray(b"\x01" * (32 << 20)))
for rnd in range(4):
    for i in range(64):
        h.aio_pwrite(buf, (i % 32) << 25)
    while h.aio_in_flight() > 0:
        h.poll(-1)
'
for srv in nbdkit "$OURS"; do
  "$srv" -f -U "$out/sock" -P "$out/pid" memory 1G &
  while [ ! -S "$out/sock" ]; do sleep 0.1; done
  pid=$(cat "$out/pid")
  /usr/bin/python3 -c "$flood" "nbd+unix:///?socket=$out/sock" &
  py=$!; peak=0
  while kill -0 $py 2>/dev/null; do
    rss=$(ps -o rss= -p "$pid" | tr -d ' '); [ "${rss:-0}" -gt "$peak" ] && peak=$rss
    sleep 0.1
  done
  wait $py
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -f "$out/sock"
  echo "$srv: peak RSS $((peak / 1024)) MiB while 8 GiB of 32 MiB writes went to a 1 GiB disk"
done
