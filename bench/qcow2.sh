#!/usr/bin/env bash
# qcow2 written natively by our qcow2 filter, against qemu's writers,
# side by side in alternating rounds (as bench/xz.sh):
#
#  1. The headline pipeline into qcow2, a 1 GiB disk-like image in
#     16 MiB xz blocks served by nginx on loopback:
#       ours native:   nbdkit curl --filter=xz URL --run
#                        'nbdcopy -- $uri [ nbdkit --filter=qcow2 file out.qcow2 create=true size=1G ]'
#                      (nbdcopy serves its captive nbdkit in-process)
#       ours native, spawned: the same with NBDCOPY_SPAWN_CAPTIVE=1 (the
#                      captive nbdkit a process of its own, over a socket)
#       ours+qemu-nbd: the same with [ qemu-nbd -f qcow2 out.qcow2 ] (after qemu-img create)
#       upstream:      upstream nbdkit and libnbd's nbdcopy into [ qemu-nbd ... ]
#       floor:         ours into null: (the curl+xz decode alone)
#  2. A raw file into qcow2:
#       ours:          nbdcopy disk.raw [ nbdkit --filter=qcow2 file out.qcow2 create=true size=1G ]
#       qemu-img -t writeback: qemu-img convert -t writeback -f raw -O qcow2 disk.raw out.qcow2
#                      (like ours, the image is synced when it is closed)
#       ours unsynced: ours with --filter=fua fuamode=discard under the qcow2
#                      filter: its syncs are dropped (the like of qemu-img's default)
#       qemu-img:      qemu-img convert -f raw -O qcow2 disk.raw out.qcow2, whose
#                      default cache mode for the output is unsafe: no sync at all
#       ours+qemu-nbd: nbdcopy disk.raw [ qemu-nbd -f qcow2 out.qcow2 ]
#       floor:         nbdcopy disk.raw [ nbdkit file out.raw ] (the same copy
#                      with no qcow2 in it)
# Every output is checked once with qemu-img compare and qemu-img check;
# prints medians, ratios and the servers' peak RSS.
#
# Usage: bench/qcow2.sh   (builds the release nbdkit and nbdcopy first)
# Environment: SIZE_MIB (default 1024), RUNS (rounds, default 3),
# BENCH_CACHE (a directory keeping the image between runs, default: none).
BENCH_NAME=qcow2bench
. "$(dirname "$0")/xz-image.sh"

native() { # $1 = source (nbdcopy's), $2 = nbdcopy program
  echo "$2 -- $1 [ $OURS --filter=qcow2 file $out create=true size=$size ]"
}
viaqemu() { # $1 = source, $2 = nbdcopy program
  echo "$2 -- $1 [ qemu-nbd -f qcow2 $out ]"
}
headline() { # $1 = nbdkit program, $2 = the copy command
  echo "$1 -U - curl --filter=xz $URL --run '$2'"
}
declare -A rss
check_out() {
  qemu-img compare -q -f raw -F qcow2 "$img" "$out" || { echo "$1: output differs!" >&2; exit 1; }
  qemu-img check -q "$out" || { echo "$1: qemu-img check failed!" >&2; exit 1; }
}
# The raw floor's output goes too (outside the timed run).
outraw=$work/out.raw
prepare="$prepare; rm -f $outraw"
eval "$prepare"
rss[native]=$(peak_rss "$OURS" -U - curl --filter=xz "$URL" --run "$(native '$uri' "$OURCOPY")")
check_out native
eval "$prepare"
rss[nativecopy]=$(PEAK_OF=nbdcopy peak_rss "$OURS" -U - curl --filter=xz "$URL" --run "$(native '$uri' "$OURCOPY")")
check_out native
eval "$prepare"
rss[viaqemu]=$(peak_rss "$OURS" -U - curl --filter=xz "$URL" --run "$(viaqemu '$uri' "$OURCOPY")")
check_out viaqemu
eval "$prepare"
rss[raw]=$(PEAK_OF=nbdcopy peak_rss bash -c "$(native "$img" "$OURCOPY")")
check_out raw
eval "$prepare"
qemu-img convert -f raw -O qcow2 "$img" "$out"
check_out qemu-img
eval "$prepare"
$OURCOPY -- "$img" [ "$OURS" --filter=qcow2 --filter=fua file "$out" create=true size="$size" fuamode=discard ]
check_out unsynced

# 4. Side by side, alternating: each round runs every contender once,
# in an order that rotates from round to round, so that a slow spell of
# the shared disk or host (they last seconds to minutes here) hits all
# of them alike instead of the one whose runs it happened to fall on.
# Before each run: a fresh image, and `sync` (the old image's blocks are
# discarded on this ext4, and that I/O must not land in the timed run).
# alternate JSON NAME CMD [NAME CMD ...]: RUNS rounds; JSON gets each
# contender's times and median, as hyperfine's export.
alternate() {
  local json=$1; shift
  local names=() cmds=()
  while [ $# -gt 0 ]; do names+=("$1"); cmds+=("$2"); shift 2; done
  local n=${#names[@]} r i k
  for r in $(seq "$RUNS"); do
    for i in $(seq 0 $((n - 1))); do
      k=$(((i + r) % n))
      hyperfine -w 0 -r 1 --prepare "$prepare; sync" --export-json "$work/alt-$r-$k.json" \
        -n "${names[$k]}" "${cmds[$k]}" >/dev/null 2>&1 ||
        { echo "failed: ${cmds[$k]}" >&2; exit 1; }
    done
  done
  /usr/bin/python3 - "$json" "$work" "$RUNS" "${names[@]}" <<'PY'
import json, statistics, sys
out, work, runs, names = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
res = []
for k, name in enumerate(names):
    t = [json.load(open(f"{work}/alt-{r}-{k}.json"))["results"][0]["times"][0]
         for r in range(1, runs + 1)]
    res.append({"command": name, "times": t, "median": statistics.median(t)})
    print(f"  {name:<30} median {statistics.median(t):.3f}s  "
          f"range {min(t):.3f}-{max(t):.3f}s", file=sys.stderr)
json.dump({"results": res}, open(out, "w"))
PY
}
echo "== headline pipeline into qcow2 ($RUNS alternating rounds)" >&2
alternate "$work/h.json" \
  "ours native" "$(headline "$OURS" "$(native '$uri' "$OURCOPY")")" \
  "ours native, spawned" "$(headline "$OURS" "$(native '$uri' "NBDCOPY_SPAWN_CAPTIVE=1 $OURCOPY")")" \
  "ours+qemu-nbd" "$(headline "$OURS" "$(viaqemu '$uri' "$OURCOPY")")" \
  upstream "$(headline nbdkit "$(viaqemu '$uri' nbdcopy)")" \
  "floor (null:)" "$(headline "$OURS" "$OURCOPY -- \$uri null:")"
echo "== raw file into qcow2 ($RUNS alternating rounds)" >&2
alternate "$work/r.json" \
  "ours native" "$(native "$img" "$OURCOPY")" \
  "qemu-img convert -t writeback" "qemu-img convert -t writeback -f raw -O qcow2 $img $out" \
  "ours unsynced" "$OURCOPY -- $img [ $OURS --filter=qcow2 --filter=fua file $out create=true size=$size fuamode=discard ]" \
  "qemu-img convert" "qemu-img convert -f raw -O qcow2 $img $out" \
  "ours+qemu-nbd" "$(viaqemu "$img" "$OURCOPY")" \
  "floor (raw file)" "truncate -s $size $outraw && $OURCOPY -- $img [ $OURS file $outraw ]"
/usr/bin/python3 - "$work/h.json" "$work/r.json" "${rss[native]}" "${rss[viaqemu]}" "${rss[raw]}" "${rss[nativecopy]}" <<'PY'
import json, sys
h = {x["command"]: x["median"] for x in json.load(open(sys.argv[1]))["results"]}
r = {x["command"]: x["median"] for x in json.load(open(sys.argv[2]))["results"]}
n, q, u = h["ours native"], h["ours+qemu-nbd"], h["upstream"]
print(f"curl+xz -> qcow2: ours native {n:.2f}s  ours+qemu-nbd {q:.2f}s  upstream {u:.2f}s")
print(f"  native vs ours+qemu-nbd {q/n:.2f}x   native vs upstream {u/n:.2f}x")
sp = h["ours native, spawned"]
print(f"  native with the captive nbdkit spawned {sp:.2f}s: in-process {sp/n:.2f}x faster, "
      f"spawned vs ours+qemu-nbd {q/sp:.2f}x")
f = h["floor (null:)"]
print(f"  floor (curl+xz -> null:) {f:.2f}s: native at {n/f:.2f}x the floor, "
      f"the best native vs ours+qemu-nbd would be {q/f:.2f}x")
n, w, q = r["ours native"], r["qemu-img convert -t writeback"], r["ours+qemu-nbd"]
nu, c = r["ours unsynced"], r["qemu-img convert"]
print(f"raw -> qcow2, synced at close: ours native {n:.2f}s  qemu-img convert -t writeback {w:.2f}s"
      f"  ours+qemu-nbd {q:.2f}s")
print(f"  native vs qemu-img convert -t writeback {w/n:.2f}x   native vs ours+qemu-nbd {q/n:.2f}x")
print(f"raw -> qcow2, never synced: ours unsynced {nu:.2f}s  qemu-img convert (cache=unsafe) {c:.2f}s")
print(f"  ours unsynced vs qemu-img convert {c/nu:.2f}x")
f = r["floor (raw file)"]
print(f"  floor (nbdcopy into [ nbdkit file ]) {f:.2f}s: native at {n/f:.2f}x the floor, "
      f"qemu-img convert at {c/f:.2f}x it")
print(f"peak RSS (MiB): the curl+xz nbdkit {sys.argv[3]} (native pipeline), {sys.argv[4]} (via qemu-nbd); "
      f"nbdcopy with the qcow2 server in it {sys.argv[6]} (native pipeline), {sys.argv[5]} (raw->qcow2)")
PY
