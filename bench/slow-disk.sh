#!/usr/bin/env bash
# Run a benchmark with the disk's writes throttled, as in the spells when
# this shared host's disk is slow, but reproducibly: the command and all
# it starts run in a cgroup-v1 blkio group whose writes to the root
# file system's disk are limited. The throttle applies to writes the
# processes issue themselves (an fsync's writeback: qemu-nbd's flushes),
# not to the kernel's own background writeback.
#
# Usage: bench/slow-disk.sh [bench/xz.sh]   (as root)
# Environment: WRITE_IOPS (default 200), WRITE_BPS (bytes a second,
# default: no limit); the other variables go to the benchmark.
#
# With WRITE_IOPS=200 the headline copy into qcow2 behaved as in a slow
# spell: background flushes every 16M, back to back, made it 1.81 s
# (upstream 3.37 s) until they were paced (nbdcopy's `Writeback`).
set -euo pipefail
cd "$(dirname "$0")/.."
blkio=/sys/fs/cgroup/blkio
if [ ! -w "$blkio" ]; then
  echo "slow-disk.sh: needs root and cgroup v1's blkio controller at $blkio" >&2
  exit 1
fi
dev=$(lsblk -no PKNAME "$(findmnt -no SOURCE --target "${TMPDIR:-/var/tmp}")" 2>/dev/null | head -1)
dev=${dev:-$(basename "$(findmnt -no SOURCE --target "${TMPDIR:-/var/tmp}")")}
majmin=$(cat "/sys/class/block/$dev/dev")
group=$blkio/nbd-bench-slow-disk
mkdir -p "$group"
echo "$majmin ${WRITE_IOPS:-200}" > "$group/blkio.throttle.write_iops_device"
echo "$majmin ${WRITE_BPS:-0}" > "$group/blkio.throttle.write_bps_device"
echo "== writes to $dev ($majmin) throttled: ${WRITE_IOPS:-200} a second, ${WRITE_BPS:-no} bytes a second" >&2
echo $$ > "$group/cgroup.procs"
status=0
"${@:-bench/xz.sh}" || status=$?
echo $$ > "$blkio/cgroup.procs"
rmdir "$group" 2>/dev/null || true
exit $status
