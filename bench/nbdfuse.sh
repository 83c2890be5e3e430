#!/usr/bin/env bash
# Our nbdfuse against libnbd's (/usr/bin/nbdfuse), side by side in one run,
# on the same server (our nbdkit's memory plugin, on a Unix socket):
#  1. sequential write of SIZE (default 1 GiB) with dd bs=1M conv=fdatasync
#  2. sequential read of it with dd bs=1M, page cache dropped first
# Each round mounts both, runs both in turn (alternating which goes first),
# and prints MB/s; the end prints the medians and ratios (ours / upstream:
# > 1 means ours is faster). A third line, ours with -o writeback_cache,
# shows what the kernel's write-back gathering adds (upstream can do the same
# through libfuse's -o writeback_cache).
#
# Usage: bench/nbdfuse.sh   (as root, needs fuse3; builds release binaries)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NBDFUSE:-}" ]; then
  cargo build --release --bin nbdkit --bin nbdfuse >&2
  NBDFUSE=$PWD/target/release/nbdfuse
  NBDKIT=$PWD/target/release/nbdkit
fi
NBDKIT=${NBDKIT:-$(dirname "$NBDFUSE")/nbdkit}
UPSTREAM=${UPSTREAM:-/usr/bin/nbdfuse}
ROUNDS=${ROUNDS:-5}
SIZE_MB=${SIZE_MB:-1024}
out=$(mktemp -d)
mounts=()
pids=()
cleanup() {
  for m in "${mounts[@]}"; do fusermount3 -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  # Each nbdfuse flushes and disconnects after its unmount: let it.
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "${srv:-}" ] && kill "$srv" 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT

"$NBDKIT" -f -U "$out/sock" memory "${SIZE_MB}M" &
srv=$!
while [ ! -S "$out/sock" ]; do sleep 0.1; done
uri="nbd+unix:///?socket=$out/sock"

# mount NAME PROG [OPTS...]: mount on $out/NAME, wait for the pidfile.
mount_one() {
  local name=$1 prog=$2; shift 2
  mkdir -p "$out/$name"
  "$prog" -P "$out/$name.pid" "$@" "$out/$name" "$uri" &
  pids+=($!)
  mounts+=("$out/$name")
  for _ in $(seq 200); do [ -s "$out/$name.pid" ] && return; sleep 0.05; done
  echo "$name: not mounted" >&2; exit 1
}

# MB/s of one dd (its last line: "... copied, 1.23 s, 870 MB/s").
mbps() {
  dd "$@" 2>&1 | awk '/copied/ { t = $(NF-3); } END { printf "%.0f\n", '"$SIZE_MB"' * 1.048576 / t }'
}
write_mbps() { mbps if=/dev/zero of="$1/nbd" bs=1M count="$SIZE_MB" conv=notrunc,fdatasync; }
read_mbps() { sync; echo 3 > /proc/sys/vm/drop_caches; mbps if="$1/nbd" of=/dev/null bs=1M; }

mount_one upstream "$UPSTREAM"
mount_one ours "$NBDFUSE"
mount_one ours-wb "$NBDFUSE" -o writeback_cache
# Fill the disk once so that no run pays for the server's first allocation.
dd if=/dev/zero of="$out/ours/nbd" bs=1M count="$SIZE_MB" conv=notrunc,fdatasync 2>/dev/null

declare -A W R
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then order="upstream ours ours-wb"; else order="ours-wb ours upstream"; fi
  for who in $order; do
    w=$(write_mbps "$out/$who"); r=$(read_mbps "$out/$who")
    W[$who]+="$w "; R[$who]+="$r "
    echo "round $round $who: write $w MB/s, read $r MB/s" >&2
  done
done

median() { tr ' ' '\n' | grep . | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
uw=$(echo "${W[upstream]}" | median); ur=$(echo "${R[upstream]}" | median)
echo "== sequential ${SIZE_MB} MiB through the mount, median of $ROUNDS (MB/s)"
printf "%-26s %8s %8s\n" "" write read
for who in upstream ours ours-wb; do
  w=$(echo "${W[$who]}" | median); r=$(echo "${R[$who]}" | median)
  label=$who; [ "$who" = ours-wb ] && label="ours -o writeback_cache"
  printf "%-26s %8s %8s   ratio write %sx read %sx\n" "$label" "$w" "$r" \
    "$(awk "BEGIN { printf \"%.2f\", $w / $uw }")" "$(awk "BEGIN { printf \"%.2f\", $r / $ur }")"
done
