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
# and a slow spell skews a mean) and each server's peak RSS.
#
# Usage: bench/xz.sh   (builds the release nbdkit first)
# Environment: SIZE_MIB (default 1024), RUNS (default 3), BENCH_CACHE (a
# directory keeping the image between runs, default: none).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin nbdkit --bin nbdcopy >&2
OURS=${CARGO_TARGET_DIR:-$PWD/target}/release/nbdkit
OURCOPY=${CARGO_TARGET_DIR:-$PWD/target}/release/nbdcopy
SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/xzbench.XXXXXX")
ngpid=
cleanup() {
  [ -n "$ngpid" ] && kill "$ngpid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# 1. The image (kept in BENCH_CACHE if set).
cache=${BENCH_CACHE:-$work}
mkdir -p "$cache" "$work/www"
img=$cache/disk-$SIZE_MIB.raw
if [ ! -f "$img.xz" ]; then
  echo "== making a $SIZE_MIB MiB disk-like image" >&2
  /usr/bin/python3 - "$img" "$SIZE_MIB" <<'PY'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
rnd = random.Random(1)
text = (b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do "
        b"eiusmod tempor incididunt ut labore et dolore magna aliqua. %d\n")
with open(path, "wb") as f:
    left = mib << 20
    while left > 0:
        n = min(left, rnd.choice([1, 2, 4, 8]) << 20)
        kind = rnd.random()
        if kind < 0.30:
            f.write(os.urandom(n))                      # compressed or encrypted data
        elif kind < 0.65:
            line = text % rnd.randint(0, 1 << 30)       # logs, text, code
            f.write((line * (n // len(line) + 1))[:n])
        else:
            f.write(b"\0" * n)                          # free space
        left -= n
PY
  echo "== xz -T2 --block-size=16MiB" >&2
  xz -T2 --block-size=16MiB -k -f "$img"
fi
xz --list "$img.xz" >&2
ln -s "$img.xz" "$work/www/disk.raw.xz"

# 2. nginx on a free loopback port.
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path $work/cb; proxy_temp_path $work/px;
  fastcgi_temp_path $work/fc; uwsgi_temp_path $work/uw; scgi_temp_path $work/sc;
  default_type application/octet-stream;
  sendfile on;
  keepalive_requests 100000;
  server { listen 127.0.0.1:$port; root $work/www; location / { disable_symlinks off; } }
}
EOF
/usr/sbin/nginx -p "$work" -e "$work/error.log" -c "$work/nginx.conf" &
ngpid=$!
for _ in $(seq 100); do
  /usr/bin/python3 -c "import socket; socket.create_connection(('127.0.0.1',$port)).close()" 2>/dev/null && break
  sleep 0.1
done
URL=http://127.0.0.1:$port/disk.raw.xz
out=$work/out.qcow2
size=$((SIZE_MIB << 20))

pipeline() { # $1 = nbdkit program, $2 = nbdcopy program
  echo "$1 -U - curl --filter=xz $URL --run '$2 -- \$uri [ qemu-nbd -f qcow2 $out ]'"
}
prepare="rm -f $out; qemu-img create -q -f qcow2 $out $size"

# 3. Check both produce the right image once, measuring peak RSS.
peak_rss() { # runs the command; prints the peak RSS in MiB of the nbdkit
  # server process (upstream's --run makes the server a child of the
  # command's shell, so look at the whole process tree)
  /usr/bin/python3 - "$@" <<'PY'
import os, subprocess, sys, time
p = subprocess.Popen(sys.argv[1:])
peak = {}
def tree(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                st = open(f"/proc/{d}/stat").read()
                kids.setdefault(int(st[st.rindex(")") + 2:].split()[1]), []).append(int(d))
            except OSError:
                pass
    out, todo = [], [root]
    while todo:
        x = todo.pop()
        out.append(x)
        todo += kids.get(x, [])
    return out
while p.poll() is None:
    for pid in tree(p.pid):
        try:
            st = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status"))
            if st["Name"].strip() == "nbdkit":
                peak[pid] = max(peak.get(pid, 0), int(st["VmHWM"].split()[0]))
        except (OSError, KeyError, ValueError):
            pass
    time.sleep(0.05)
if p.returncode != 0:
    sys.exit(f"failed: {sys.argv[1:]}")
print(max(peak.values(), default=0) // 1024)
PY
}
declare -A rss
for who in upstream ours; do
  prog=nbdkit copy=nbdcopy; [ $who = ours ] && prog=$OURS copy=$OURCOPY
  eval "$prepare"
  rss[$who]=$(peak_rss "$prog" -U - curl --filter=xz "$URL" --run "$copy -- \$uri [ qemu-nbd -f qcow2 $out ]")
  qemu-img compare -q -f raw -F qcow2 "$img" "$out" || { echo "$who: output differs!" >&2; exit 1; }
done

# 4. Side by side.
echo "== pipeline into qcow2 ($RUNS runs each)" >&2
hyperfine -w 0 -r "$RUNS" --export-json "$work/h.json" --prepare "$prepare" \
  -n upstream "$(pipeline nbdkit nbdcopy)" \
  -n ours "$(pipeline "$OURS" "$OURCOPY")" \
  -n "our nbdkit, libnbd's nbdcopy" "$(pipeline "$OURS" nbdcopy)" \
  -n "xz -T2 -d" "xz -T2 -d -c $img.xz > /dev/null" >&2
# The same without the qcow2 writer (decoding and serving only), and the
# floor of the qcow2 writer: the raw image from upstream's file plugin.
echo "== pipeline into null: and the qcow2 floor ($RUNS runs each)" >&2
hyperfine -w 0 -r "$RUNS" --export-json "$work/n.json" --prepare "$prepare" \
  -n upstream "nbdkit -U - curl --filter=xz $URL --run 'nbdcopy \$uri null:'" \
  -n ours "$OURS -U - curl --filter=xz $URL --run '$OURCOPY \$uri null:'" \
  -n floor "$OURCOPY -- $img [ qemu-nbd -f qcow2 $out ]" >&2
/usr/bin/python3 - "$work/h.json" "$work/n.json" "${rss[upstream]}" "${rss[ours]}" <<'PY'
import json, sys
r = {x["command"]: x["median"] for x in json.load(open(sys.argv[1]))["results"]}
n = {x["command"]: x["median"] for x in json.load(open(sys.argv[2]))["results"]}
up, ours, xz = r["upstream"], r["ours"], r["xz -T2 -d"]
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
