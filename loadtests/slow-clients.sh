#!/usr/bin/env bash
# Slow clients against breakwater with Debian's slowhttptest (apt package `slowhttptest`):
# slowloris (-H), slow body (-B) and slow read (-X, a 1 MiB answer read a few bytes at a
# time; X8 the same with an 8 MiB answer, more than the kernel buffers per connection),
# each with CONNS connections, while a loop of normal requests runs alongside.
# Prints, per attack: breakwater's RSS before / peak / after, the most upstream connections
# to the mock AI held at once, and the normal requests' success rate and worst latency.
# Everything stays on 127.0.0.1 and each attack stops by itself after DURATION seconds.
#   loadtests/slow-clients.sh [H|B|X|X8|all] (env: CONNS=500 DURATION=60 EXTRA_SERVER="...")
set -euo pipefail
cd "$(dirname "$0")/.."
MODES=${1:-all}
[ "$MODES" = all ] && MODES="H B X"
CONNS=${CONNS:-500}
DURATION=${DURATION:-60}
BIN=${BIN:-target/release}
command -v slowhttptest >/dev/null || { echo "slowhttptest missing: apt-get install -y slowhttptest" >&2; exit 2; }
[ -n "${NO_BUILD:-}" ] || cargo build --release -p breakwater -p loadtests --bins >&2
ulimit -n 20000 || true

PORT=${PORT:-18480}
ADMIN=${ADMIN:-18481}
MOCK=${MOCK:-18482}
WORK=$(mktemp -d /tmp/slow-clients.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$WORK/audit.key"
cat > "$WORK/breakwater.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN"
watch_config = false
max_connections = 4096
${EXTRA_SERVER:-}

[audit]
path = "$WORK/decisions.jsonl"
hmac_key_file = "$WORK/audit.key"

[upstreams.ai]
url = "http://127.0.0.1:$MOCK"

[[routes]]
name = "slow"
path_prefix = "/"
upstream = "ai"
timeout_ms = 5000
EOF

"$BIN/mock-ai" --listen "127.0.0.1:$MOCK" --threads 1 2>"$WORK/mock.log" &
pids+=($!)
"$BIN/breakwater" --config "$WORK/breakwater.toml" 2>"$WORK/breakwater.log" &
BW=$!
pids+=($BW)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$BW/status"; }
upstream_conns() { ss -tnH state established "( dport = :$MOCK )" | wc -l; }

# One attack: samples RSS and upstream connections every 0.5 s and runs normal requests
# (one every 0.1 s, 10 s timeout each) until slowhttptest ends.
attack() {
  local mode=$1 url args
  case $mode in
    H) url="http://127.0.0.1:$PORT/v1/normal"; args=(-H -i 5 -x 24) ;;
    B) url="http://127.0.0.1:$PORT/v1/normal"; args=(-B -i 5 -x 24 -s 65536) ;;
    X) url="http://127.0.0.1:$PORT/bytes/1048576"; args=(-X -k 1 -n 1 -w 1 -y 512 -z 5) ;;
    # 8 MiB: more than the kernel buffers per connection, so breakwater's own bounds act.
    X8) url="http://127.0.0.1:$PORT/bytes/8388608"; args=(-X -k 1 -n 1 -w 1 -y 512 -z 5) ;;
  esac
  local before peak=0 conns_peak=0 after
  before=$(rss_kb)
  timeout $((DURATION + 30)) slowhttptest "${args[@]}" -c "$CONNS" -r 250 -l "$DURATION" \
    -p 10 -u "$url" >"$WORK/slow-$mode.log" 2>&1 &
  local sh=$!
  : > "$WORK/normal-$mode.txt"
  (
    while kill -0 "$sh" 2>/dev/null; do
      curl -s -o /dev/null --max-time 10 -w '%{http_code} %{time_total}\n' \
        "http://127.0.0.1:$PORT/v1/normal" >> "$WORK/normal-$mode.txt" || echo "000 10" >> "$WORK/normal-$mode.txt"
      sleep 0.1
    done
  ) &
  local loop=$!
  while kill -0 "$sh" 2>/dev/null; do
    local r c
    r=$(rss_kb); c=$(upstream_conns)
    [ "$r" -gt "$peak" ] && peak=$r
    [ "$c" -gt "$conns_peak" ] && conns_peak=$c
    sleep 0.5
  done
  wait "$loop" 2>/dev/null || true
  sleep 3
  after=$(rss_kb)
  local total ok worst
  total=$(wc -l < "$WORK/normal-$mode.txt")
  ok=$(awk '$1 == 200' "$WORK/normal-$mode.txt" | wc -l)
  worst=$(awk 'BEGIN {m = 0} $2 > m {m = $2} END {print m}' "$WORK/normal-$mode.txt")
  # slowhttptest's status lines: "connected:  N", "closed:  N" (plain text without a tty).
  local closed maxconn
  closed=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/slow-$mode.log" | grep -oE 'closed:[[:space:]]*[0-9]+' | tail -1 | grep -oE '[0-9]+$' || echo "?")
  maxconn=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/slow-$mode.log" | grep -oE 'connected:[[:space:]]*[0-9]+' | grep -oE '[0-9]+$' | sort -n | tail -1 || echo "?")
  local ended
  ended=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/slow-$mode.log" | grep -E '^(Test ended|Exit status)' | tr '\n' ' ')
  printf 'slowhttptest -%s conns=%s duration=%ss: RSS before %d MiB, peak %d MiB (+%d), after %d MiB; upstream conns peak %d; attack conns connected peak %s, closed at last status %s (%s); normal %d/%d ok, worst %ss\n' \
    "$mode" "$CONNS" "$DURATION" $((before / 1024)) $((peak / 1024)) $(((peak - before) / 1024)) $((after / 1024)) \
    "$conns_peak" "$maxconn" "$closed" "$ended" "$ok" "$total" "$worst"
  awk '$1 != 200' "$WORK/normal-$mode.txt" | sort | uniq -c | head -5 | sed 's/^/  failed normal: /'
}

for m in $MODES; do attack "$m"; done
echo "cancelled records in the decision log: $(grep -c '"outcome":"cancelled"' "$WORK/decisions.jsonl" || true)"
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E '^breakwater_(response_buffer|response_write|connections_)' || true
