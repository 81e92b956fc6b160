#!/usr/bin/env bash
# On-demand hostile-client run: tests/hostile.rs at full size, one test at a time so the
# figures do not disturb each other. Prints every figure line and keeps the whole output
# in target/hostile-report.txt.
#
#   loadtests/hostile.sh                 # 500 held connections; h2load: 100,000 requests,
#                                        # 100 connections x 10 streams
#   CONNS=1000 H2LOAD_REQUESTS=20000 PROFILE=release loadtests/hostile.sh
#
# Needs python3 with h2 (pip install h2) and h2load (apt-get install nghttp2-client).
# All traffic goes to 127.0.0.1 and every part stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

CONNS=${CONNS:-500}
H2LOAD_REQUESTS=${H2LOAD_REQUESTS:-100000}
H2LOAD_CLIENTS=${H2LOAD_CLIENTS:-100}
H2LOAD_STREAMS=${H2LOAD_STREAMS:-10}
PROFILE=${PROFILE:-dev}

# The test process and breakwater each hold one descriptor per held connection.
want=$((CONNS * 2 + 1024))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$want" ]; then
    ulimit -n "$want" || { echo "ulimit -n $want refused; lower CONNS" >&2; exit 1; }
fi

# Without CI=true a missing python h2 or h2load would skip a test: here it must fail.
export CI=true
export BREAKWATER_HOSTILE_CONNS=$CONNS
export BREAKWATER_H2LOAD_REQUESTS=$H2LOAD_REQUESTS
export BREAKWATER_H2LOAD_CLIENTS=$H2LOAD_CLIENTS
export BREAKWATER_H2LOAD_STREAMS=$H2LOAD_STREAMS
export RUST_BACKTRACE=0

mkdir -p target
report=target/hostile-report.txt
echo "hostile run: $(date -u +%FT%TZ), profile $PROFILE, $(nproc) CPUs, ulimit -n $(ulimit -n)" | tee "$report"
status=0
cargo test --profile "$PROFILE" --test hostile -- --nocapture --test-threads=1 >>"$report" 2>&1 || status=$?
grep -E '^(test |h2 floods|  \{|h2load flood|held [0-9]+ hostile|test result)' "$report" || true
exit "$status"
