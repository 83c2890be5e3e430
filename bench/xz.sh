#!/usr/bin/env bash
# The headline pipeline, ours against upstream, side by side in one run:
#
#   nbdkit curl --filter=xz http://127.0.0.1:PORT/disk.raw.xz \
#       --run 'nbdcopy -- $uri [ qemu-nbd -f qcow2 out.qcow2 ]'
#
# for a 1 GiB disk-like image (runs of random data, text and zeroes)
# compressed with `xz -T2 --block-size=16MiB`, served by nginx on
# loopback: upstream nbdkit with libnbd's nbdcopy against our nbdkit with
# our nbdcopy (and, to tell the server's share, our nbdkit with libnbd's
# nbdcopy). Also times `xz -T2 -d` on the same file and the floor of the
# qcow2 writer (the raw image, no decoding), and prints the ratios
# (upstream time / our time: > 1 means ours is faster, from the median
# runs: the disk's speed on these shared machines swings from run to run
# and a slow spell skews a mean) and each server's peak RSS. The
# contenders run in alternating rounds (each once per round, the order
# rotating), so that a slow spell falls on all of them alike: run one
# after the other, five runs each, the ratio swung from 47% to 59% over
# one afternoon while alternating runs gave 48-53%.
#
# Usage: bench/xz.sh   (builds the release nbdkit first)
# Environment: SIZE_MIB (default 1024), RUNS (rounds, default 3),
# BENCH_CACHE (a directory keeping the image between runs, default: none).
BENCH_NAME=xzbench
. "$(dirname "$0")/xz-image.sh"

pipeline() { # $1 = nbdkit program, $2 = nbdcopy program
  echo "$1 -U - curl --filter=xz $URL --run '$2 -- \$uri [ qemu-nbd -f qcow2 $out ]'"
}
declare -A rss
for who in upstream ours; do
  prog=nbdkit copy=nbdcopy; [ $who = ours ] && prog=$OURS copy=$OURCOPY
  eval "$prepare"
  rss[$who]=$(peak_rss "$prog" -U - curl --filter=xz "$URL" --run "$copy -- \$uri [ qemu-nbd -f qcow2 $out ]")
  qemu-img compare -q -f raw -F qcow2 "$img" "$out" || { echo "$who: output differs!" >&2; exit 1; }
done

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
echo "== pipeline into qcow2 ($RUNS alternating rounds)" >&2
alternate "$work/h.json" \
  upstream "$(pipeline nbdkit nbdcopy)" \
  ours "$(pipeline "$OURS" "$OURCOPY")" \
  "our nbdkit, libnbd's nbdcopy" "$(pipeline "$OURS" nbdcopy)"
hyperfine -w 0 -r "$RUNS" --export-json "$work/x.json" \
  -n "xz -T2 -d" "xz -T2 -d -c $img.xz > /dev/null" >&2
# The same without the qcow2 writer (decoding and serving only), and the
# floor of the qcow2 writer: the raw image from upstream's file plugin.
echo "== pipeline into null: and the qcow2 floor ($RUNS alternating rounds)" >&2
alternate "$work/n.json" \
  upstream "nbdkit -U - curl --filter=xz $URL --run 'nbdcopy \$uri null:'" \
  ours "$OURS -U - curl --filter=xz $URL --run '$OURCOPY \$uri null:'" \
  floor "$OURCOPY -- $img [ qemu-nbd -f qcow2 $out ]"
/usr/bin/python3 - "$work/h.json" "$work/n.json" "${rss[upstream]}" "${rss[ours]}" "$work/x.json" <<'PY'
import json, sys
r = {x["command"]: x["median"] for x in json.load(open(sys.argv[1]))["results"]}
n = {x["command"]: x["median"] for x in json.load(open(sys.argv[2]))["results"]}
xz = json.load(open(sys.argv[5]))["results"][0]["median"]
up, ours = r["upstream"], r["ours"]
mixed = r["our nbdkit, libnbd's nbdcopy"]
print(f"curl+xz -> qcow2: upstream {up:.2f}s  ours {ours:.2f}s  ratio {up/ours:.2f}x "
      f"(ours takes {100*ours/up:.0f}% of upstream's time)")
print(f"  our nbdkit under libnbd's nbdcopy: {mixed:.2f}s  ratio {up/mixed:.2f}x")
print(f"curl+xz -> null:  upstream {n['upstream']:.2f}s  ours {n['ours']:.2f}s  "
      f"ratio {n['upstream']/n['ours']:.2f}x")
print(f"xz -T2 -d alone: {xz:.2f}s  (ours -> null / xz -T2 -d = {n['ours']/xz:.2f})")
print(f"qcow2 floor (raw file -> qcow2 by our nbdcopy, no decoding): {n['floor']:.2f}s "
      f"= {100*n['floor']/up:.0f}% of upstream's pipeline")
print(f"peak RSS of nbdkit: upstream {sys.argv[3]} MiB  ours {sys.argv[4]} MiB")
PY
