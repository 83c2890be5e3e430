#!/usr/bin/env bash
# Our nbdcopy against libnbd's, side by side in one run, same source and
# destination, same (default) settings:
#  1. upstream `nbdkit pattern 4G` -> null:
#  2. a 2 GiB random file -> our `nbdkit memory 2G`
#  3. a 1 TiB sparse export (upstream nbdkit data plugin, 3 x 64K of
#     data) -> our `nbdkit memory 1T`
#  4. a 2 GiB random file -> a new local file, then `sync` of that file
#     (both write the file back as they go and drop what was written
#     from the page cache; the sync times whatever is left)
# and two more, as users run it:
#  5. our `nbdkit pattern 4G` -> null: (case 1's server is upstream's,
#     and on 2 cores it is what bounds that case; with ours as the
#     server, the clients' own difference shows more)
#  6. a 2 GiB random file -> `[ qemu-nbd -f qcow2 out.qcow2 ]` (a new
#     image): the usual way to write a qcow2
# Each case runs in ROUNDS rounds of hyperfine, the order of the two
# programs swapped every round so neither always goes first; the ratio
# is upstream time / our time (> 1: ours is faster; median runs, as a
# slow spell of the shared disk skews a mean). Then, for each
# nbdcopy alone (not the servers, nor a captive qemu-nbd) in the same
# setting: its peak RSS and the CPU seconds it used (user + system), the
# share of the two cores it takes away from the server, which bounds
# the dense cases here.
#
# Usage: bench/nbdcopy.sh   (builds the release binaries first)
# Env:   RUNS (per round, default 5), ROUNDS (default 2), SIZE (default 4G),
#        FILE_SIZE (default 2G), TMPDIR (where the 2 GiB files go)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin nbdcopy --bin nbdkit >&2
OURS=$PWD/target/release/nbdcopy
OURKIT=$PWD/target/release/nbdkit
UP=$(command -v nbdcopy)
RUNS=${RUNS:-5}
ROUNDS=${ROUNDS:-2}
SIZE=${SIZE:-4G}
FILE_SIZE=${FILE_SIZE:-2G}
command -v hyperfine >/dev/null || { echo "hyperfine is missing" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/nbdcopy-bench.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

echo "== preparing a $FILE_SIZE random file" >&2
head -c "$FILE_SIZE" /dev/urandom >"$work/random.img"
# The sparse source lives for the whole run.
nbdkit -f -U "$work/sparse.sock" -P "$work/sparse.pid" data \
  data="@0 (1)*65536 @549755813888 (2)*65536 @1099511562240 (3)*65536" size=1T &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/sparse.sock" ] && break; sleep 0.05; done
SPARSE="nbd+unix:///?socket=$work/sparse.sock"

# case NAME PREPARE CMD-WITH-@NBDCOPY@: time both programs, print the ratio.
results=()
bench() {
  local name=$1 prepare=$2 cmd=$3
  local up=${cmd//@NBDCOPY@/$UP} ours=${cmd//@NBDCOPY@/$OURS}
  echo "== $name" >&2
  local t_up=0 t_ours=0
  for r in $(seq "$ROUNDS"); do
    local json="$work/$r.json"
    if [ $((r % 2)) = 1 ]; then
      hyperfine -N -w 1 -r "$RUNS" --prepare "$prepare" --export-json "$json" \
        -n upstream "$up" -n ours "$ours" >&2
    else
      hyperfine -N -w 1 -r "$RUNS" --prepare "$prepare" --export-json "$json" \
        -n ours "$ours" -n upstream "$up" >&2
    fi
    read -r a b < <(python3 -c '
import json, sys
r = {x["command"]: x["median"] for x in json.load(open(sys.argv[1]))["results"]}
print(r["upstream"], r["ours"])' "$json")
    t_up=$(python3 -c "print($t_up + $a)")
    t_ours=$(python3 -c "print($t_ours + $b)")
  done
  # Peak RSS and CPU time of nbdcopy itself (not the servers).
  local rss_up cpu_up rss_ours cpu_ours
  eval "$prepare"
  read -r rss_up cpu_up < <(rss "$up")
  eval "$prepare"
  read -r rss_ours cpu_ours < <(rss "$ours")
  results+=("$(python3 -c "
up, ours = $t_up / $ROUNDS, $t_ours / $ROUNDS
print(f'{\"$name\":<28} upstream {up:6.3f}s  ours {ours:6.3f}s  ratio {up/ours:4.2f}x  '
      f'RSS {$rss_up/1024:5.1f} / {$rss_ours/1024:5.1f} MiB  '
      f'client CPU {$cpu_up:5.2f} / {$cpu_ours:5.2f} s')")")
}

# "PEAK-RSS-KiB CPU-SECONDS" of the nbdcopy in a command, its own (not
# its children's: GNU time's %M and %U would count a captive qemu-nbd
# too): the nbdcopy word runs under self.py, which samples its VmHWM and
# reads its CPU time once it has exited, before reaping it.
cat >"$work/self.py" <<'PY'
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execvp(argv[0], argv)
hwm = 0
while True:
    try:
        for l in open(f"/proc/{pid}/status"):
            if l.startswith("VmHWM:"):
                hwm = max(hwm, int(l.split()[1]))
    except (OSError, ValueError):
        pass
    if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
        break
    time.sleep(0.01)
f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
cpu = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
_, status = os.waitpid(pid, 0)
open(out, "w").write(f"{hwm} {cpu:.2f}\n")
sys.exit(os.waitstatus_to_exitcode(status))
PY
rss() {
  local cmd=$1 out="$work/rss"
  local t="python3 $work/self.py $out"
  local timed=${cmd/"$UP "/"$t $UP "}
  timed=${timed/"$OURS "/"$t $OURS "}
  sh -c "$timed" >/dev/null 2>&1
  cat "$out"
}

bench "pattern $SIZE -> null:" "true" \
  "nbdkit -U - pattern $SIZE --run '@NBDCOPY@ \$uri null:'"
bench "$FILE_SIZE file -> our memory" "true" \
  "$OURKIT -U - memory $FILE_SIZE --run '@NBDCOPY@ $work/random.img \$uri'"
bench "1T sparse -> our memory 1T" "true" \
  "$OURKIT -U - memory 1T --run '@NBDCOPY@ $SPARSE \$uri'"
bench "$FILE_SIZE file -> file" "rm -f $work/out.img; sync" \
  "sh -c '@NBDCOPY@ $work/random.img $work/out.img && sync $work/out.img'"
bench "our pattern $SIZE -> null:" "true" \
  "$OURKIT -U - pattern $SIZE --run '@NBDCOPY@ \$uri null:'"
printf '#!/bin/sh\nrm -f %s\nexec qemu-img create -q -f qcow2 %s %s\n' \
  "$work/out.qcow2" "$work/out.qcow2" "$FILE_SIZE" >"$work/qcow2.sh"
chmod +x "$work/qcow2.sh"
bench "$FILE_SIZE file -> [ qemu-nbd qcow2 ]" "$work/qcow2.sh" \
  "@NBDCOPY@ -- $work/random.img [ qemu-nbd -f qcow2 $work/out.qcow2 ]"

echo
echo "(RSS and client CPU: upstream / ours; CPU is the nbdcopy process alone, one run)"
printf '%s\n' "${results[@]}"
