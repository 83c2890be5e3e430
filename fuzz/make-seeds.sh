#!/usr/bin/env bash
# Make the seed corpus fuzz/corpus/TARGET/ (committed; run again only to
# remake it): real handshakes and requests recorded from libnbd's tools
# and upstream nbdkit, our client's scripts against upstream nbdkit, URIs,
# data expressions, .xz files made by xz, MBR and GPT disks made by
# sfdisk and sgdisk. Needs nbdkit, libnbd-bin, python3-libnbd, xz-utils,
# fdisk, gdisk, and the fuzz-targets examples built (cargo build -p
# fuzz-targets --examples).
set -euo pipefail
# nbdsh needs the python3 that has libnbd's module (Debian's).
export PATH=/usr/bin:/usr/sbin:$PATH
cd "$(dirname "$0")"
root=$PWD/..
c=$PWD/corpus
rm -rf "$c"
mkdir -p "$c"/{server,server_requests,client_negotiate,client_replies,uri,data_expr,xz,partition}
tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- Upstream nbdkit, and a relay recording what clients send it.
sport=$(free_port)
nbdkit -f -p "$sport" -i 127.0.0.1 memory 1M &
pids+=($!)
pport=$(free_port)
python3 proxy.py "$pport" "$sport" "$tmp/client" &
pids+=($!)
sleep 1
uri=nbd://127.0.0.1:$pport
nbdinfo "$uri" >/dev/null
nbdinfo --list "$uri" >/dev/null
nbdinfo --map "$uri" >/dev/null
nbdsh -c '
h.add_meta_context("base:allocation")
h.connect_uri("'"$uri"'")
h.pwrite(b"\x01" * 4096, 0, nbd.CMD_FLAG_FUA)
h.pread(8192, 0)
h.pread(512, 4096)
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)
h.trim(4096, 16384)
h.cache(4096, 0)
h.flush()
h.block_status(1 << 20, 0, lambda *a: 0)
h.block_status(4096, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
'
nbdsh -c '
h.set_request_structured_replies(False)
h.connect_uri("'"$uri"'")
h.pwrite(b"\x02" * 512, 512)
h.pread(1024, 0)
h.flush()
'
nbdsh -c '
h.set_opt_mode(True)
h.connect_uri("'"$uri"'")
h.opt_list(lambda *a: 0)
h.opt_list_meta_context(lambda *a: 0)
h.add_meta_context("base:allocation")
h.set_full_info(True)
h.opt_info()
h.opt_go()
h.pread(4096, 1 << 19)
'
nbdsh -c '
h.set_opt_mode(True)
h.connect_uri("'"$uri"'")
h.opt_abort()
'
sleep 1
n=0
for f in "$tmp"/client-*.bin; do
  n=$((n + 1))
  cp "$f" "$c/server/libnbd-$n.bin"
  # The requests after the handshake (up to GO or EXPORT_NAME).
  python3 - "$f" "$c/server_requests/libnbd-$n.bin" <<'PY'
import struct, sys
b = open(sys.argv[1], "rb").read()
i = 4
while i + 16 <= len(b):
    _, opt, n = struct.unpack(">QII", b[i:i + 16])
    i += 16 + n
    if opt in (1, 7):
        if b[i:]:
            open(sys.argv[2], "wb").write(b[i:])
        break
PY
done

# Handcrafted client streams: old-style EXPORT_NAME, STARTTLS without
# TLS, meta context queries, an option too large, garbage requests.
python3 - "$c" <<'PY'
import struct, sys
c = sys.argv[1]
M = 0x49484156454F5054
def o(opt, data=b""):
    return struct.pack(">QII", M, opt, len(data)) + data
def s32(s):
    return struct.pack(">I", len(s)) + s
def req(typ, off, count, flags=0, cookie=1):
    return struct.pack(">IHHQQI", 0x25609513, flags, typ, cookie, off, count)
open(f"{c}/server/export-name.bin", "wb").write(
    struct.pack(">I", 1) + o(1, b"") + req(0, 0, 512) + req(1, 0, 4) + b"abcd" + req(2, 0, 0))
open(f"{c}/server/options.bin", "wb").write(
    struct.pack(">I", 3) + o(5) + o(3) + o(8) + o(10, s32(b"") + struct.pack(">I", 2) + s32(b"base:") + s32(b"x:y"))
    + o(9, s32(b"") + struct.pack(">I", 1) + s32(b"base:allocation"))
    + o(6, s32(b"") + struct.pack(">H", 3) + struct.pack(">HHH", 0, 1, 3)) + o(99, b"junk")
    + struct.pack(">QII", M, 7, 100000) + o(2))
open(f"{c}/server_requests/mixed.bin", "wb").write(
    req(0, 0, 4096, 4, 1) + req(7, 0, 1 << 20, 8, 2) + req(6, 4096, 8192, 2 | 4, 3)
    + req(1, 1 << 20, 16) + b"x" * 16 + req(0, (1 << 64) - 1, 1) + req(99, 0, 0) + req(2, 0, 0))
PY

# --- Our client's scripts against upstream nbdkit (what it sends back).
rec=$root/target/debug/examples/record
for ctl in 0 7 8 16 96 135 143 255; do
  "$rec" negotiate "$ctl" "127.0.0.1:$sport" "$c/client_negotiate/nbdkit-$ctl.bin"
done
"$rec" replies "127.0.0.1:$sport" "$c/client_replies/nbdkit.bin"
# An old-style server (greeting only), and a server listing exports.
python3 - "$c" <<'PY'
import struct, sys
c = sys.argv[1]
open(f"{c}/client_negotiate/oldstyle.bin", "wb").write(
    bytes([0]) + b"NBDMAGIC" + struct.pack(">QQI", 0x00420281861253, 1 << 20, 3) + bytes(124))
PY

# --- URIs.
i=0
while IFS= read -r u; do
  i=$((i + 1))
  printf '%s' "$u" >"$c/uri/$i.txt"
done <<'URIS'
nbd://localhost
nbd://example.com:10810/disk
nbds://alice@[::1]:1234/a%20b?tls-certificates=/etc/pki&tls-verify-peer=0
nbd+unix:///export?socket=/tmp/sock
nbds+unix://bob@/?socket=%2Frun%2Fs&tls-psk-file=/keys.psk&tls-type=psk
nbd+vsock://2:10809/x
nbds://host/?tls-hostname=other&tls-username=u&x-extra=1
nbd://[fe80::1%25eth0]:10809/
NBD://127.0.0.1/%2F%3F%23
nbd+unix://?socket=relative
URIS

# --- Data expressions (no files, no scripts: the fuzz target has none).
i=0
while IFS= read -r d; do
  i=$((i + 1))
  printf '%s' "$d" >"$c/data_expr/$i.txt"
done <<'DATA'
0 1 2 3 @0x1fe 0x55 0xaa
 ( 0x55 0xAA )*2048 
 ( "Hello" )*2000 
0 1 2 3 @^0x200 @-2 le16:0xaa55
be32:0xdeadbeef le64:1 be16:0777 "\x41\102\n\t\\\""
$a*16 $b @+1 $a[1:3]
( 1 2 3 ) -> \x \x*3 ( \x @+2 \x )[2:]
( 0 @+65536 1 )*100 @^4096 @100000000 0xff
# a comment
1 # another ( not a group
$r
(((((1)*2)*3)*4)[1:20] @-5 7)
DATA

# --- .xz files made by xz.
seq 1 2000 >"$tmp/text"
xz -c "$tmp/text" >"$c/xz/one-block.xz"
xz -c --block-size=2048 "$tmp/text" >"$c/xz/blocks.xz"
xz -c --check=none -0 "$tmp/text" >"$c/xz/check-none.xz"
xz -c --check=sha256 "$tmp/text" >"$c/xz/check-sha256.xz"
printf '' | xz -c >"$c/xz/empty.xz"
{ printf 'first' | xz -c; printf '\0\0\0\0'; printf 'second' | xz -c --check=crc32; } >"$c/xz/streams-padding.xz"

# --- Partition tables made by sfdisk and sgdisk (byte 0: partition
# number - 1, then the disk).
disk() { # NAME PART SECTORS: the disk in $tmp/disk
  { printf "\\x$(printf %02x $(($2 - 1)))"; cat "$tmp/disk"; } >"$c/partition/$1.bin"
}
truncate -s 64K "$tmp/disk"
sfdisk -q --no-reread --no-tell-kernel "$tmp/disk" <<'SF'
label: dos
unit: sectors
start=2, size=20, type=83
start=22, size=90, type=5
start=112, size=10, type=c
SF
sfdisk -q --no-reread --no-tell-kernel --append "$tmp/disk" <<'SF'
start=24, size=10, type=83
start=36, size=10, type=83
start=48, size=20, type=82
SF
disk mbr-1 1
disk mbr-3 3
disk mbr-logical-6 6
disk mbr-logical-7 7
rm "$tmp/disk"
truncate -s 48K "$tmp/disk"
sgdisk -q -a 1 -n 1:34:40 -t 1:8300 -n 2:41:60 -t 2:ef00 "$tmp/disk" >/dev/null
disk gpt-1 1
disk gpt-2 2
disk gpt-3 3
ls -l "$c"/*/ | awk '{print $5, $9}' | grep -v '^ $' | head -100
