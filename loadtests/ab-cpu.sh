#!/usr/bin/env bash
# A/B of two breakwater binaries by CPU time per request: both run at once on the same
# generated config (their own ports), pinned to core 0, with one mock AI and the load driver
# on core 1; alternating open-loop runs (A, B, A, B, ...), each reporting that process's
# user+system CPU from /proc/PID/stat over the run divided by the requests it served. The
# medians and B/A at the end. Loopback only; bounded by --rounds x 2 x --duration seconds.
#   loadtests/ab-cpu.sh A_BIN B_BIN [--rounds 5] [--duration 8] [--rate 3000] [--path /v1/x]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,8p "$0"; exit 2; }
a_bin=$1 b_bin=$2
shift 2
rounds=5 duration=8 rate=3000 path=/v1/recommendations
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --path) path="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x target/release/loadtests ] && [ -x target/release/mock-ai ] || cargo build -q --release -p loadtests
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock=$(port)
taskset -c 1 target/release/mock-ai --listen "127.0.0.1:$mock" --threads 1 >"$dir/mock.log" 2>&1 &
pids+=($!)
start() { # name bin -> "pid listen"
  local listen admin
  listen=$(port) admin=$(port)
  cat >"$dir/$1.toml" <<EOF
[server]
listen = "127.0.0.1:$listen"
admin_listen = "127.0.0.1:$admin"
watch_config = false

[upstreams.ai]
url = "http://127.0.0.1:$mock"
pool_max_idle_per_host = 1024

[[routes]]
name = "bench"
path_prefix = "/"
upstream = "ai"
timeout_ms = 2000
model_version_header = "x-model-version"
EOF
  RUST_LOG=warn taskset -c 0 "$2" --config "$dir/$1.toml" >"$dir/$1.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "$pid $listen"
}
read -r a_pid a_port < <(start a "$a_bin")
pids+=("$a_pid")
read -r b_pid b_port < <(start b "$b_bin")
pids+=("$b_pid")
run() { # port pid -> CPU µs/req (last column of the load row)
  taskset -c 1 target/release/loadtests load --target "127.0.0.1:$1" --path "$path" \
    --rate "$rate" --duration "$duration" --connections 32 --pid "$2" \
    | awk -F'|' '/^\| /{v=$(NF-1)} END{gsub(/ /,"",v); print v}'
}
run "$a_port" "$a_pid" >/dev/null; run "$b_port" "$b_pid" >/dev/null # warm-up
as=() bs=()
for i in $(seq 1 "$rounds"); do
  a=$(run "$a_port" "$a_pid"); b=$(run "$b_port" "$b_pid")
  as+=("$a"); bs+=("$b")
  echo "round $i: A $a µs/req, B $b µs/req"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
ma=$(median "${as[@]}") mb=$(median "${bs[@]}")
echo "median CPU per request on $path at $rate req/s: A $ma µs, B $mb µs, B/A $(awk -v a="$ma" -v b="$mb" 'BEGIN{printf "%.3f", b/a}')"
