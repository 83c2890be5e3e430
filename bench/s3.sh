#!/usr/bin/env bash
# Our S3 plugin against upstream's Python one (boto3), side by side on the
# same local store (s3s-fs over a directory in $TMPDIR), with libnbd's
# nbdcopy as the client in every case:
#  1-3. reading a 1 GiB object (single-object mode) to null: with 1, 4
#       and 16 requests in flight (nbdcopy -C 1 -R N);
#  4.   copying a 1 GiB random file into a new chunked disk, each plugin
#       at its best object size: upstream's largest, 64K (it advertises
#       the object size as the minimum block size, and refuses more),
#       ours 8M (OBJECT_SIZE).
# The ratio is upstream time / ours (> 1: ours is faster), from the median
# of RUNS runs, the two alternating. Then the request counts the store saw
# for case 4 (objects written).
#
# Usage: bench/s3.sh   (builds the release binaries first)
# Env:   RUNS (default 3), SIZE (default 1G), OBJECT_SIZE (default 8M),
#        TMPDIR (where the store's directory goes)
set -euo pipefail
cd "$(dirname "$0")/.."
flock /tmp/release.lock cargo build --release --bin nbdkit >&2
OURS=$PWD/target/release/nbdkit
RUNS=${RUNS:-3}
SIZE=${SIZE:-1G}
OBJECT_SIZE=${OBJECT_SIZE:-8M}
for p in hyperfine s3s-fs nbdcopy nbdkit curl; do
  command -v "$p" >/dev/null || { echo "$p is missing" >&2; exit 1; }
done
[ -e /usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-S3-plugin ] ||
  { echo "upstream's S3 plugin is missing (nbdkit-plugin-python, python3-boto3)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/s3-bench.XXXXXX")
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/store/bench"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
s3s-fs --host 127.0.0.1 --port "$port" --access-key AK --secret-key SK "$work/store" \
  >/dev/null 2>&1 &
pid=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.05; done
S3="S3 endpoint-url=http://127.0.0.1:$port access-key=AK secret-key=SK bucket=bench"

echo "== preparing a $SIZE random file and object" >&2
head -c "$SIZE" /dev/urandom >"$work/random.img"
# Uploaded by PUT, so that the store keeps its ETag (an object copied into
# its directory is hashed again at every GET).
curl -sSf --aws-sigv4 "aws:amz:us-east-1:s3" --user AK:SK \
  -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" -T "$work/random.img" \
  "http://127.0.0.1:$port/bench/object.img" >/dev/null
sync

results=()
bench() { # NAME OURS-CMD UPSTREAM-CMD [PREPARE]
  local name=$1 ours=$2 up=$3 prep=${4:-true}
  echo "== $name" >&2
  hyperfine --runs "$RUNS" --prepare "$prep" --export-json "$work/h.json" \
    -n ours "$ours" -n upstream "$up" >&2
  local r
  r=$(python3 - "$work/h.json" <<'EOF'
import json, statistics, sys
d = {r["command"]: statistics.median(r["times"]) for r in json.load(open(sys.argv[1]))["results"]}
print(f'ours {d["ours"]:.2f} s, upstream {d["upstream"]:.2f} s, ratio {d["upstream"]/d["ours"]:.2f}')
EOF
)
  results+=("$name: $r")
}

for n in 1 4 16; do
  cmd="nbdkit -U - $S3 key=object.img --run 'nbdcopy -C 1 -R $n \$uri null:'"
  bench "read 1 object, $n in flight" "${cmd/nbdkit/$OURS}" "$cmd"
done
ours_copy="$OURS -U - $S3 key=ours size=$SIZE object-size=$OBJECT_SIZE --run 'nbdcopy $work/random.img \$uri'"
up_copy="nbdkit -U - $S3 key=theirs size=$SIZE object-size=64k --run 'nbdcopy $work/random.img \$uri'"
bench "copy into a chunked disk" "$ours_copy" "$up_copy" \
  "rm -rf $work/store/bench/ours $work/store/bench/theirs"

# hyperfine's prepare step removed the disks between runs: one more of each.
rm -rf "$work/store/bench/ours" "$work/store/bench/theirs"
eval "$ours_copy"; eval "$up_copy"
echo
printf '%s\n' "${results[@]}"
echo "objects per copy: ours $(ls "$work/store/bench/ours" 2>/dev/null | wc -l) ($OBJECT_SIZE each), upstream $(ls "$work/store/bench/theirs" 2>/dev/null | wc -l) (64K each)"
