#!/usr/bin/env bash
# Build the fuzz targets with libFuzzer on the stable toolchain and run
# each for a bounded time, printing the executions of each.
#
#   fuzz/run.sh [SECONDS_PER_TARGET [TARGET...]]   (default 20 s, all targets)
#
# libFuzzer comes from libfuzzer-sys (built from its bundled sources with
# the C++ compiler); coverage is LLVM's SanitizerCoverage, whose -C
# passes/llvm-args options are stable (cargo-fuzz adds nothing else with
# --sanitizer none but -Zbuild-std, which we do without). No sanitizer:
# ASan needs the nightly -Zsanitizer; Rust's own checks (bounds,
# overflow: debug assertions are on) are what catch bugs here.
#
# New inputs go to fuzz/work/corpus/TARGET (the seeds in fuzz/corpus/TARGET
# are read, never written); a crash or hang is saved under
# fuzz/artifacts/TARGET/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
shift || true
all=(server server_requests client_negotiate client_replies uri data_expr xz partition)
targets=("${@:-${all[@]}}")
if (($# == 0)); then targets=("${all[@]}"); fi
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing"
triple=$(rustc -vV | sed -n 's/^host: //p')
# --target: RUSTFLAGS then reach the targets' code but not build scripts.
cargo build --locked --target "$triple" --bins
bin=target/$triple/debug
status=0
passed=0
failed=0
summary=()
for t in "${targets[@]}"; do
  case $t in
    xz | partition) max_len=65536 ;;
    server | server_requests | client_negotiate) max_len=16384 ;;
    client_replies) max_len=32768 ;;
    *) max_len=4096 ;;
  esac
  mkdir -p "work/corpus/$t" "artifacts/$t"
  log=work/$t.log
  rc=0
  # -close_fd_mask=2: the targets' own error messages (a server
  # logging a bad client) would slow the fuzzer down.
  "$bin/$t" -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 \
    -max_len="$max_len" -close_fd_mask=2 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" "work/corpus/$t" "corpus/$t" >"$log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  line="$t: ${runs:-?} executions in ${secs} s, ${cov:-cov: ?}, corpus $(ls "work/corpus/$t" | wc -l) new"
  if ((rc != 0)); then
    line="$line: FAILED (exit $rc), see fuzz/$log and fuzz/artifacts/$t/"
    tail -30 "$log" >&2
    status=1
    failed=$((failed + 1))
  else
    passed=$((passed + 1))
  fi
  echo "$line"
  summary+=("$line")
done
echo "fuzzing summary:"
printf '  %s\n' "${summary[@]}"
echo "fuzz: $passed passed, $failed failed"
exit $status
