#!/bin/sh
# On-demand chaos runs with checked invariants (issue 14). Each prints a JSON report and
# exits 1 if an invariant failed; reports also go to $OUT (default loadtests/reports/chaos).
#
#   loadtests/chaos.sh                 # all three, full length (~20 min)
#   loadtests/chaos.sh kill9 --loops 20
#   loadtests/chaos.sh broker --restarts 3
#   loadtests/chaos.sh soak --duration 60 --rate 300
#
# kill9 publishes to the shared RabbitMQ on 127.0.0.1:5672 (it stops nothing there);
# broker starts its own node on 127.0.0.1:5690 (dist 25690) and stops it by PID; soak uses
# 5672 for the DLQ. Traffic goes to 127.0.0.1 only. Runs nice'd.
set -eu
cd "$(dirname "$0")/.."
OUT=${OUT:-loadtests/reports/chaos}
cargo build --release -p breakwater -p loadtests
run() { nice -n 10 target/release/loadtests chaos "$@" --out "$OUT"; }
if [ $# -gt 0 ]; then
    run "$@"
else
    run kill9 --loops 100
    run broker --restarts 10
    run soak --duration 600 --rate 500
fi
