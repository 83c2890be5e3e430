#!/usr/bin/env bash
# TLS (PSK, TLS 1.3) ours against upstream, side by side in one run:
#  1. server: libnbd's nbdcopy of SIZE (default 4G) from `pattern` over
#     nbds+unix:// to null:, our nbdkit vs upstream nbdkit;
#  2. client: our nbdcopy vs libnbd's nbdcopy from upstream nbdkit;
#  3. for scale, the same copy in plaintext from our server.
# Prints the ratios (upstream time / ours: > 1 means ours is faster).
#
# Usage: bench/tls.sh   (builds the release binaries first; needs psktool)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NBDKIT:-}" ]; then
  cargo build --release --bin nbdkit --bin nbdcopy >&2
  NBDKIT=$PWD/target/release/nbdkit
fi
NBDCOPY=${NBDCOPY:-$(dirname "$NBDKIT")/nbdcopy}
RUNS=${RUNS:-3}
SIZE=${SIZE:-4G}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
psktool -u alice -p "$out/keys.psk" >/dev/null
tls="--tls=require --tls-psk=$out/keys.psk"
uri='nbds+unix://alice@/?socket=$unixsocket\&tls-psk-file='"$out/keys.psk"

ratio() {
  python3 - "$1" "$2" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
print(f"{sys.argv[2]}: upstream {r['upstream']:.3f}s ours {r['ours']:.3f}s ratio {r['upstream']/r['ours']:.2f}x")
PY
}

echo "== server: libnbd nbdcopy over TLS, $SIZE ($RUNS runs each)" >&2
hyperfine -N -w 1 -r "$RUNS" --export-json "$out/server.json" \
  -n upstream "nbdkit -U - $tls pattern $SIZE --run \"nbdcopy $uri null:\"" \
  -n ours "$NBDKIT -U - $tls pattern $SIZE --run \"nbdcopy $uri null:\"" >&2
ratio "$out/server.json" "TLS server (libnbd nbdcopy)"

echo "== client: nbdcopy over TLS from upstream nbdkit, $SIZE" >&2
hyperfine -N -w 1 -r "$RUNS" --export-json "$out/client.json" \
  -n upstream "nbdkit -U - $tls pattern $SIZE --run \"nbdcopy $uri null:\"" \
  -n ours "nbdkit -U - $tls pattern $SIZE --run \"$NBDCOPY $uri null:\"" >&2
ratio "$out/client.json" "TLS client (upstream nbdkit)"

echo "== both ours, TLS and plaintext, $SIZE" >&2
hyperfine -N -w 1 -r "$RUNS" --export-json "$out/plain.json" \
  -n upstream "$NBDKIT -U - $tls pattern $SIZE --run \"$NBDCOPY $uri null:\"" \
  -n ours "$NBDKIT -U - pattern $SIZE --run '$NBDCOPY \$uri null:'" >&2
python3 - "$out/plain.json" <<'PY'
import json, sys
r = {x["command"]: x["mean"] for x in json.load(open(sys.argv[1]))["results"]}
print(f"ours end to end: TLS {r['upstream']:.3f}s plaintext {r['ours']:.3f}s (TLS costs {r['upstream']/r['ours']:.2f}x)")
PY
