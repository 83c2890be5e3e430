#!/usr/bin/env bash
# The nbd plugin (a proxy) ours against upstream's, side by side in one
# run, in front of the same server (our nbdkit `memory`, prefilled, on a
# Unix socket), with libnbd's clients:
#  1. nbdcopy of SIZE (default 2G) from the proxy to null:
#  2. nbdcopy of SIZE from a file into the proxy
#  3. fio random 4K reads at queue depth 32 through the proxy
# Prints the ratios (upstream time / ours, ours IOPS / upstream: > 1 means
# ours is faster).
#
# Usage: bench/nbd-plugin.sh   (builds the release binaries first)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NBDKIT:-}" ]; then
  cargo build --release --bin nbdkit >&2
  NBDKIT=$PWD/target/release/nbdkit
fi
RUNS=${RUNS:-5}
SIZE=${SIZE:-2G}
out=$(mktemp -d)
"$NBDKIT" -f -U "$out/backend.sock" memory "$SIZE" &
backend=$!
trap 'kill $backend 2>/dev/null; rm -rf "$out"' EXIT
while [ ! -S "$out/backend.sock" ]; do sleep 0.1; done
# Fill the backend so reads carry data.
nbdkit -U - pattern "$SIZE" --run "nbdcopy \$uri 'nbd+unix:///?socket=$out/backend.sock'"
head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom > "$out/src.img"
proxy="nbd socket=$out/backend.sock"

ratio() {
  python3 - "$1" "$2" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
print(f"{sys.argv[2]}: upstream {r['upstream']:.3f}s ours {r['ours']:.3f}s ratio {r['upstream']/r['ours']:.2f}x")
PY
}

echo "== nbdcopy proxy -> null: ($RUNS runs each)" >&2
hyperfine -N -w 1 -r "$RUNS" --export-json "$out/read.json" \
  -n upstream "nbdkit -U - $proxy --run 'nbdcopy \$uri null:'" \
  -n ours "$NBDKIT -U - $proxy --run 'nbdcopy \$uri null:'" >&2
ratio "$out/read.json" "nbdcopy proxy->null"

echo "== nbdcopy file -> proxy: ($RUNS runs each)" >&2
hyperfine -N -w 1 -r "$RUNS" --export-json "$out/write.json" \
  -n upstream "nbdkit -U - $proxy --run 'nbdcopy $out/src.img \$uri'" \
  -n ours "$NBDKIT -U - $proxy --run 'nbdcopy $out/src.img \$uri'" >&2
ratio "$out/write.json" "nbdcopy file->proxy"

fio_iops() {
  "$1" -U - $proxy --run "fio --name=rr --ioengine=nbd --uri=\"\$uri\" --rw=randread --bs=4k \
      --iodepth=32 --size=$SIZE --runtime=${FIO_TIME:-10} --time_based --output-format=json" |
    python3 -c 'import json,sys; s=sys.stdin.read(); print(json.loads(s[s.index("{"):])["jobs"][0]["read"]["iops"])'
}
echo "== fio randread 4k QD32 through the proxy" >&2
up=$(fio_iops nbdkit)
ours=$(fio_iops "$NBDKIT")
python3 -c "print(f'fio randread 4k: upstream {$up:.0f} IOPS ours {$ours:.0f} IOPS ratio {$ours/$up:.2f}x')"
