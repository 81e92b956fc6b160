#!/usr/bin/env bash
# Runs every fuzz target in turn, one at a time and nice'd, and prints its executions.
#   fuzz/run.sh [SECONDS] [RUNS] [TARGET...]
# Each target stops after SECONDS (default 60) or RUNS executions (default -1: no limit),
# whichever comes first. New corpus entries go to a scratch dir, so the committed seeds in
# fuzz/corpus/<target>/ stay small. A crash leaves its input in fuzz/artifacts/<target>/
# and makes the script exit non-zero (after the remaining targets have run).
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
runs=${2:--1}
shift $(( $# < 2 ? $# : 2 ))
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(config spool audit_line envelope headers)
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
# -a: debug assertions on, so integer overflow is caught as in the test suite.
nice cargo +nightly fuzz build -a || exit 1
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=0
printf '%-12s %14s %8s %s\n' TARGET EXECUTIONS SECONDS RESULT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "artifacts/$t"
    log="$scratch/$t.log"
    start=$(date +%s)
    nice cargo +nightly fuzz run -a "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$secs" -runs="$runs" -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" >"$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - start ))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    if [ $rc -eq 0 ]; then
        result=ok
    else
        result="CRASH (rc $rc): $(grep -m1 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$log" || true)"
        grep -E '^(thread .* panicked|Test unit written|.*panicked at)' -A3 "$log" | head -20
        failed=1
    fi
    printf '%-12s %14s %8s %s\n' "$t" "${execs:-?}" "$took" "$result"
done
exit $failed
