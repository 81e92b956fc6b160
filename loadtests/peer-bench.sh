#!/usr/bin/env bash
# Peer benchmark: the same mock AI and the same offered load through breakwater (decision
# log on), nginx and HAProxy, each pinned to core 0 (mock and load driver on core 1), one
# after another in one run. Installs nginx and HAProxy from Debian packages if missing.
# All traffic stays on 127.0.0.1; every run is bounded in time.
#   loadtests/peer-bench.sh [--duration 10] [--rates 1000,5000]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
# The packages start system services on install; this benchmark runs its own instances.
service nginx stop >/dev/null 2>&1 || true
service haproxy stop >/dev/null 2>&1 || true
cargo build --release -p breakwater -p loadtests
exec target/release/loadtests peer --pin "$@"
