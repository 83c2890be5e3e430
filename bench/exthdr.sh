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
# Prints the time of each copy and the requests qemu-nbd received by
# type (from its `nbd_receive_request` trace), on each side. One run each
# by default (RUNS=n for more): upstream takes minutes.
#
# Usage: bench/exthdr.sh   (NBDCOPY=path to ours; default: the release
# build, built first; PARTS="sparse zero" by default)
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

# One copy, timed, with the requests of each type it made on both servers.
measure() { # label src dst tool
  : >"$out/$2.log"
  : >"$out/$3.log"
  local t0 t1
  t0=$(date +%s.%N)
  "$4" "$(uri "$2")" "$(uri "$3")"
  t1=$(date +%s.%N)
  python3 - "$1" "$t0" "$t1" "$2" "$out/$2.log" "$3" "$out/$3.log" <<'PY'
import collections, re, sys
names = {0: "read", 1: "write", 4: "trim", 6: "write_zeroes", 7: "block_status"}
label, t0, t1 = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
parts = []
for name, path in zip(sys.argv[4::2], sys.argv[5::2]):
    c = collections.Counter()
    big = 0
    for l in open(path):
        m = re.search(r"\.type = 0x([0-9a-f]+), from = \d+, len = (\d+)", l)
        if m and int(m.group(1), 16) in names:
            c[names[int(m.group(1), 16)]] += 1
            big = max(big, int(m.group(2)))
    parts.append(f"{name}: {dict(c)} (largest {big})")
print(f"{label}: {t1 - t0:.3f} s; " + "; ".join(parts))
PY
}

for part in ${PARTS:-sparse zero}; do
  case $part in
  sparse)
    for run in $(seq "$RUNS"); do
      measure "sparse 1T copy, upstream" sparse sink nbdcopy
      measure "sparse 1T copy, ours" sparse sink "$NBDCOPY"
    done ;;
  zero)
    for run in $(seq "$RUNS"); do
      measure "zeroing 1T, upstream" zeroes dirty nbdcopy
      measure "zeroing 1T, ours" zeroes dirty "$NBDCOPY"
    done ;;
  esac
done
