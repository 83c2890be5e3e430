#!/usr/bin/env bash
# Extended headers (issue 25) against qemu-nbd 10, with nbdcopy: ours
# (which negotiates them) against upstream libnbd 1.14's (which cannot),
# side by side:
#  1. a sparse 1 TiB copy: a raw file with 4 MiB of data in 4 places,
#     served by qemu-nbd, to qemu's null driver (which reads as zeroes);
#  2. zeroing a 1 TiB destination: qemu's null driver reading as zeroes
#     to one that says nothing of its contents (so all of it is zeroed).
# Both destinations are qemu's `null-co`: nothing touches the disk (a raw
# file zeroed by qemu with FALLOC_FL_ZERO_RANGE would allocate the 1 TiB).
# Prints the times and the requests qemu-nbd received by type (from its
# `nbd_receive_request` trace), for each side.
#
# Usage: bench/exthdr.sh   (NBDCOPY=path to ours; default: the release
# build, built first)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NBDCOPY:-}" ]; then
  cargo build --release --bin nbdcopy >&2
  NBDCOPY=$PWD/target/release/nbdcopy
fi
RUNS=${RUNS:-1}
out=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; rm -rf "$out"' EXIT

truncate -s 1T "$out/src.img"
for o in 0 100G 500G 1023G; do
  qemu-io -f raw -c "write -P 0x5a $o 1M" "$out/src.img" >/dev/null
done

serve() { # name args...
  local name=$1
  shift
  qemu-nbd -t -k "$out/$name.sock" --trace nbd_receive_request "$@" 2>"$out/$name.log" &
  pids+=($!)
  while [ ! -S "$out/$name.sock" ]; do sleep 0.1; done
}
uri() { echo "nbd+unix:///?socket=$out/$1.sock"; }
serve sparse -r -f raw "$out/src.img"
serve zeroes --image-opts driver=null-co,size=1T,read-zeroes=on
serve sink --image-opts driver=null-co,size=1T,read-zeroes=on
serve dirty --image-opts driver=null-co,size=1T

# Requests of each type one copy makes, on both servers.
count() { # label src dst tool
  : >"$out/$2.log"
  : >"$out/$3.log"
  "$4" "$(uri "$2")" "$(uri "$3")"
  for s in "$2" "$3"; do
    python3 - "$1" "$s" "$out/$s.log" <<'PY'
import collections, re, sys
names = {0: "read", 1: "write", 4: "trim", 6: "write_zeroes", 7: "block_status"}
c = collections.Counter()
big = 0
for l in open(sys.argv[3]):
    m = re.search(r"\.type = 0x([0-9a-f]+), from = \d+, len = (\d+)", l)
    if m:
        t = int(m.group(1), 16)
        if t in names:
            c[names[t]] += 1
            big = max(big, int(m.group(2)))
print(f"{sys.argv[1]} on {sys.argv[2]}: {dict(c)} (largest length {big})")
PY
  done
}

times() { # json label
  python3 - "$1" "$2" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
print(f"{sys.argv[2]}: upstream {r['upstream']:.3f}s ours {r['ours']:.3f}s ratio {r['upstream']/r['ours']:.2f}x")
PY
}

echo "== sparse 1 TiB copy ($RUNS runs each)" >&2
hyperfine -N -w 0 -r "$RUNS" --export-json "$out/sparse.json" \
  -n upstream "nbdcopy $(uri sparse) $(uri sink)" \
  -n ours "$NBDCOPY $(uri sparse) $(uri sink)" >&2
times "$out/sparse.json" "sparse 1T copy"
count "upstream sparse copy" sparse sink nbdcopy
count "ours sparse copy" sparse sink "$NBDCOPY"

echo "== zeroing a 1 TiB destination ($RUNS runs each)" >&2
hyperfine -N -w 0 -r "$RUNS" --export-json "$out/zero.json" \
  -n upstream "nbdcopy $(uri zeroes) $(uri dirty)" \
  -n ours "$NBDCOPY $(uri zeroes) $(uri dirty)" >&2
times "$out/zero.json" "zeroing 1T"
count "upstream zeroing" zeroes dirty nbdcopy
count "ours zeroing" zeroes dirty "$NBDCOPY"
