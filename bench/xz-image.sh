# Sourced by bench/xz.sh and bench/qcow2.sh: builds the release nbdkit and
# nbdcopy, makes (or takes from BENCH_CACHE) a SIZE_MIB MiB disk-like image
# and its xz (16 MiB blocks), and serves it with nginx on a free loopback
# port. Sets OURS, OURCOPY, SIZE_MIB, RUNS, work (a temporary directory,
# removed on exit), img, URL (the .xz over HTTP), ngpid, out (a qcow2 path
# in work), size (the image's bytes), prepare (a command making a fresh
# qcow2 at out) and peak_rss (runs a command, prints its nbdkit's peak RSS).
# BENCH_NAME names the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin nbdkit --bin nbdcopy >&2
OURS=${CARGO_TARGET_DIR:-$PWD/target}/release/nbdkit
OURCOPY=${CARGO_TARGET_DIR:-$PWD/target}/release/nbdcopy
SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-3}
work=$(mktemp -d "${TMPDIR:-/var/tmp}/${BENCH_NAME:-bench}.XXXXXX")
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
# A fresh qcow2 at $out, for writers that need one made first.
prepare="rm -f $out; qemu-img create -q -f qcow2 $out $size"

peak_rss() { # runs the command; prints the peak RSS in MiB of the nbdkit
  # server process (upstream's --run makes the server a child of the
  # command's shell, so look at the whole process tree); with PEAK_OF=NAME,
  # of the processes of that name instead (nbdcopy, whose captive nbdkit of
  # ours runs inside it)
  PEAK_OF=${PEAK_OF:-nbdkit} /usr/bin/python3 - "$@" <<'PY'
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
            if st["Name"].strip() == os.environ["PEAK_OF"]:
                peak[pid] = max(peak.get(pid, 0), int(st["VmHWM"].split()[0]))
        except (OSError, KeyError, ValueError):
            pass
    time.sleep(0.05)
if p.returncode != 0:
    sys.exit(f"failed: {sys.argv[1:]}")
print(max(peak.values(), default=0) // 1024)
PY
}
