#!/usr/bin/env bash
# nbdcopy --shallow (issue 23): copying the top layer of a 1 GiB chain
# (a base with 768 MiB of data; a top with 32 scattered 2 MiB writes and
# a 1 MiB zeroed range) into a new overlay over the same base, from our
# qcow2 filter into one it creates, and from qemu-nbd -A into one made by
# qemu-img and served by qemu-nbd; beside it, the full copy of the chain
# into a new stand-alone qcow2 that the shallow copy saves. Upstream
# nbdcopy has no --shallow. Checks each overlay with qemu-img compare.
#
# Usage: bench/shallow.sh   (NBDCOPY, NBDKIT=paths to ours; default: the
# release builds, built first; RUNS=5 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NBDCOPY:-}" ] || [ -z "${NBDKIT:-}" ]; then
  cargo build --release --bin nbdcopy --bin nbdkit >&2
  NBDCOPY=$PWD/target/release/nbdcopy
  NBDKIT=$PWD/target/release/nbdkit
fi
RUNS=${RUNS:-5}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cd "$out"

qemu-img create -q -f qcow2 base.qcow2 1G
qemu-io -f qcow2 -c 'write -P 1 0 768M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 1G
writes=()
for i in $(seq 0 31); do writes+=(-c "write -P 9 $((i * 32))M 2M"); done
qemu-io -f qcow2 "${writes[@]}" -c 'write -z 900M 1M' top.qcow2 >/dev/null

hyperfine -w 1 -r "$RUNS" \
  -n "shallow, ours -> ours" \
  "rm -f new.qcow2; $NBDCOPY --shallow -- [ $NBDKIT -r --filter=qcow2 file top.qcow2 ] [ $NBDKIT --filter=qcow2 file new.qcow2 create=true size=1G backing=base.qcow2 backing-format=qcow2 ]" \
  -n "shallow, qemu-nbd -> qemu-nbd" \
  "rm -f new2.qcow2; qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 new2.qcow2 1G; $NBDCOPY --shallow -- [ qemu-nbd -r -A -f qcow2 top.qcow2 ] [ qemu-nbd -f qcow2 new2.qcow2 ]" \
  -n "full, ours -> ours" \
  "rm -f full.qcow2; $NBDCOPY -- [ $NBDKIT -r --filter=qcow2 file top.qcow2 ] [ $NBDKIT --filter=qcow2 file full.qcow2 create=true size=1G ]"
qemu-img compare top.qcow2 new.qcow2
qemu-img compare top.qcow2 new2.qcow2
ls -l top.qcow2 new.qcow2 new2.qcow2 full.qcow2
