#!/usr/bin/env bash
# The CPU cost of issue 15's checks: one breakwater (pinned to core 0) serves a 2 KiB
# recommendations answer from the mock (core 1, with the load driver) on two routes, plain
# and checked (response_schema = config/schemas/recommendations.json plus a 10% shadow to
# a second mock that reports another model version). Alternating open-loop runs, plain
# then checked, each reporting breakwater's CPU time per request (user+system from
# /proc/PID/stat over the run); the medians and their ratio at the end. Loopback only; bounded by --rounds x 2 x --duration seconds.
#   loadtests/compliance-cost.sh [--rounds 5] [--duration 8] [--rate 3000]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=5 duration=8 rate=3000
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
cargo build -q --release -p breakwater -p loadtests
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock=$(port) cand=$(port) listen=$(port) admin=$(port)
taskset -c 1 target/release/mock-ai --listen "127.0.0.1:$mock" --threads 1 >"$dir/mock.log" 2>&1 &
pids+=($!)
# The candidate reports another model version: its answers differ in bytes from the
# primary's, so every comparison parses both (no equal-bytes shortcut).
taskset -c 1 target/release/mock-ai --listen "127.0.0.1:$cand" --threads 1 >"$dir/cand.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do curl -fsS "http://127.0.0.1:$cand/__mock/stats" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS -X POST "http://127.0.0.1:$cand/__mock/faults" -d '{"model_version":"rec-v9"}' >/dev/null
cat >"$dir/breakwater.toml" <<EOF
[server]
listen = "127.0.0.1:$listen"
admin_listen = "127.0.0.1:$admin"
watch_config = false

[upstreams.ai]
url = "http://127.0.0.1:$mock"
pool_max_idle_per_host = 1024

[upstreams.candidate]
url = "http://127.0.0.1:$cand"

[[routes]]
name = "plain"
path_prefix = "/"
upstream = "ai"
timeout_ms = 2000
model_version_header = "x-model-version"

[[routes]]
name = "checked"
path_prefix = "/checked/"
upstream = "ai"
timeout_ms = 2000
model_version_header = "x-model-version"
response_schema = "$PWD/config/schemas/recommendations.json"
shadow = { upstream = "candidate", percent = 10, compare_pointer = "/items" }
EOF
RUST_LOG=warn taskset -c 0 target/release/breakwater --config "$dir/breakwater.toml" >"$dir/bw.log" 2>&1 &
bw=$!
pids+=("$bw")
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
run() { # path -> CPU µs/req (last column of the load row)
  taskset -c 1 target/release/loadtests load --target "127.0.0.1:$listen" --path "$1" \
    --rate "$rate" --duration "$duration" --connections 32 --pid "$bw" \
    | awk -F'|' '/^\| /{v=$(NF-1)} END{gsub(/ /,"",v); print v}'
}
run /recommend/2048 >/dev/null # warm-up
plain=() checked=()
for i in $(seq 1 "$rounds"); do
  p=$(run /recommend/2048); c=$(run /checked/recommend/2048)
  plain+=("$p"); checked+=("$c")
  echo "round $i: plain $p µs/req, checked $c µs/req"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
mp=$(median "${plain[@]}") mc=$(median "${checked[@]}")
echo "median CPU per request: plain $mp µs, response_schema + 10% shadow $mc µs, ratio $(awk -v a="$mc" -v b="$mp" 'BEGIN{printf "%.3f", a/b}')"
echo "shadow results: $(curl -fsS "http://127.0.0.1:$admin/metrics" | grep '^breakwater_shadow_requests_total' | tr '\n' ' ')"
