#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, for breakwater's fleet tests and the
# broker-node-loss scenario. It never touches the machine's own broker (5672) or the shared
# epmd: its nodes have their own names, ports, data directories, HOME and Erlang cookie,
# and it stops only the processes it started, by PID.
#
#   rabbit-cluster.sh start [--ttl SECONDS]   start bw1..bw3 and join bw2, bw3 to bw1
#   rabbit-cluster.sh stop                    stop the nodes (by PID) and the watchdog
#   rabbit-cluster.sh status                  each node: pid, alive, cluster members
#   rabbit-cluster.sh kill9 N                 kill -9 node N's beam (N = 1..3)
#   rabbit-cluster.sh restart N               start node N again, wait until it rejoined
#   rabbit-cluster.sh env                     BW_CLUSTER_URLS=... (for eval / tests)
#   rabbit-cluster.sh pid N                   the beam PID of node N
#
# Nodes: bw1@localhost, bw2@localhost, bw3@localhost; AMQP 5681-5683, distribution
# 25681-25683 (BW_CLUSTER_PORT_BASE=5680 moves both). Management and prometheus plugins
# are off. Everything lives under $BW_CLUSTER_DIR (default: a mktemp dir, recorded in
# $BW_CLUSTER_STATE so later commands find it). `start --ttl S` leaves a watchdog that
# stops the nodes after S seconds, so nothing outlives a test run that died.
set -euo pipefail

NODES=3
PORT_BASE=${BW_CLUSTER_PORT_BASE:-5680}
DIST_BASE=$((PORT_BASE + 20000))
STATE=${BW_CLUSTER_STATE:-${TMPDIR:-/tmp}/breakwater-rabbit-cluster.state}
# The Debian wrappers in /usr/sbin switch to the rabbitmq user (and its cookie) when run
# as root: call the real scripts.
if [[ -z "${RABBITMQ_BIN:-}" ]]; then
    if [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then
        RABBITMQ_BIN=/usr/lib/rabbitmq/bin
    elif command -v rabbitmq-server >/dev/null 2>&1; then
        RABBITMQ_BIN=$(dirname "$(command -v rabbitmq-server)")
    else
        echo "rabbit-cluster: rabbitmq-server not found (install rabbitmq-server)" >&2
        exit 2
    fi
fi

say() { echo "rabbit-cluster: $*" >&2; }
node_name() { echo "bw$1@localhost"; }
amqp_port() { echo $((PORT_BASE + $1)); }
dist_port() { echo $((DIST_BASE + $1)); }

# The cluster's directory: $BW_CLUSTER_DIR, or the one recorded by `start`.
cluster_dir() {
    if [[ -n "${BW_CLUSTER_DIR:-}" ]]; then
        echo "$BW_CLUSTER_DIR"
    elif [[ -f "$STATE" ]]; then
        cat "$STATE"
    else
        return 1
    fi
}

# The environment one node (and rabbitmqctl aimed at it) runs with.
node_env() {
    local dir=$1 n=$2
    export HOME="$dir/home"
    export RABBITMQ_NODENAME
    RABBITMQ_NODENAME=$(node_name "$n")
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT
    RABBITMQ_NODE_PORT=$(amqp_port "$n")
    export RABBITMQ_DIST_PORT
    RABBITMQ_DIST_PORT=$(dist_port "$n")
    export RABBITMQ_MNESIA_BASE="$dir/mnesia"
    export RABBITMQ_LOG_BASE="$dir/log"
    export RABBITMQ_PID_FILE="$dir/bw$n.pid"
    export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
    export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
    export RABBITMQ_PLUGINS_EXPAND_DIR="$dir/plugins-expand-bw$n"
    export ERL_EPMD_ADDRESS=127.0.0.1
    # exec erl directly (no proxy shell), so the PID we record is the beam's.
    export RUNNING_UNDER_SYSTEMD=true
    unset NOTIFY_SOCKET || true
}

ctl() {
    local dir=$1 n=$2
    shift 2
    (node_env "$dir" "$n" && "$RABBITMQ_BIN/rabbitmqctl" -q -n "$(node_name "$n")" "$@")
}

node_pid() {
    local dir=$1 n=$2
    [[ -s "$dir/bw$n.pid" ]] && tr -dc '0-9' <"$dir/bw$n.pid"
}

alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }

launch() {
    local dir=$1 n=$2
    rm -f "$dir/bw$n.pid"
    (
        node_env "$dir" "$n"
        exec setsid "$RABBITMQ_BIN/rabbitmq-server" </dev/null >>"$dir/log/bw$n.out" 2>&1
    ) &
    # Until the node writes its pid file, the launcher's PID is the beam's (exec all
    # the way down).
    echo $! >"$dir/bw$n.pid"
}

# `await_startup` fails at once while the node has not registered with epmd yet: retry
# while the node's process lives, up to `secs`.
await_node() {
    local dir=$1 n=$2 secs=${3:-90}
    local deadline=$((SECONDS + secs))
    while ((SECONDS < deadline)); do
        if ! alive "$(node_pid "$dir" "$n" || true)"; then
            say "node $(node_name "$n") exited while starting; log: $dir/log/bw$n.out"
            tail -n 20 "$dir/log/bw$n.out" >&2 || true
            return 1
        fi
        if ctl "$dir" "$n" await_startup --timeout 10 >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.5
    done
    say "node $(node_name "$n") did not start within ${secs}s; log: $dir/log/bw$n.out"
    tail -n 20 "$dir/log/bw$n.out" >&2 || true
    return 1
}

wait_port() {
    local port=$1 secs=${2:-30}
    for _ in $(seq $((secs * 10))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

cmd_start() {
    local ttl=0
    while [[ $# -gt 0 ]]; do
        case $1 in
            --ttl) ttl=$2; shift 2 ;;
            *) say "unknown option $1"; exit 2 ;;
        esac
    done
    local dir
    if dir=$(cluster_dir 2>/dev/null) && [[ -d "$dir" ]]; then
        for n in $(seq $NODES); do
            if alive "$(node_pid "$dir" "$n")"; then
                say "already running in $dir (stop it first)"
                exit 1
            fi
        done
    fi
    for n in $(seq $NODES); do
        for port in "$(amqp_port "$n")" "$(dist_port "$n")"; do
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
                say "port $port is in use: another cluster kit, or something else, runs there"
                exit 1
            fi
        done
    done
    if [[ -n "${BW_CLUSTER_DIR:-}" ]]; then
        dir=$BW_CLUSTER_DIR
        mkdir -p "$dir"
    else
        dir=$(mktemp -d "${TMPDIR:-/tmp}/breakwater-rabbit-cluster.XXXXXX")
    fi
    echo "$dir" >"$STATE"
    mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
    # Its own cookie, so the machine's broker and this kit cannot talk to each other.
    if [[ ! -f "$dir/home/.erlang.cookie" ]]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/home/.erlang.cookie")
        chmod 400 "$dir/home/.erlang.cookie"
    fi
    echo "[]." >"$dir/enabled_plugins"
    echo "[]." >"$dir/advanced.config"
    : >"$dir/rabbitmq-env.conf"
    cat >"$dir/rabbitmq.conf" <<'EOF'
# breakwater's local cluster kit: small and quick to fail over.
loopback_users = none
disk_free_limit.absolute = 50MB
vm_memory_high_watermark.relative = 0.2
heartbeat = 10
collect_statistics = none
cluster_partition_handling = ignore
EOF
    if [[ "$ttl" != 0 ]]; then
        setsid nohup "$0" _watchdog "$ttl" "$dir" >>"$dir/log/watchdog.out" 2>&1 </dev/null &
        echo $! >"$dir/watchdog.pid"
    fi
    say "starting $NODES nodes in $dir"
    for n in $(seq $NODES); do
        launch "$dir" "$n"
    done
    for n in $(seq $NODES); do
        await_node "$dir" "$n" 120 || { cmd_stop; exit 1; }
    done
    for n in $(seq 2 $NODES); do
        ctl "$dir" "$n" stop_app >/dev/null
        ctl "$dir" "$n" join_cluster "$(node_name 1)" >/dev/null
        ctl "$dir" "$n" start_app >/dev/null
    done
    for n in $(seq $NODES); do
        wait_port "$(amqp_port "$n")" 60 || { say "node $n does not listen on $(amqp_port "$n")"; cmd_stop; exit 1; }
    done
    say "cluster up: $(cmd_env)"
    cmd_status
}

stop_pid() {
    local pid=$1
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        alive "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    local dir
    dir=$(cluster_dir) || { say "no cluster recorded"; return 0; }
    [[ -d "$dir" ]] || return 0
    local pids=()
    for n in $(seq $NODES); do
        pids+=("$(node_pid "$dir" "$n" || true)")
    done
    # All nodes at once: one by one, each remaining node waits for the departed one.
    for pid in "${pids[@]}"; do
        alive "$pid" && kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        stop_pid "$pid"
    done
    local wd
    wd=$(tr -dc '0-9' <"$dir/watchdog.pid" 2>/dev/null || true)
    if [[ -n "$wd" && "$wd" != "${BW_WATCHDOG_SELF:-}" ]] && alive "$wd"; then
        kill -TERM "$wd" 2>/dev/null || true
    fi
    rm -f "$dir"/bw*.pid "$dir/watchdog.pid"
    say "stopped (data and logs in $dir)"
    if [[ -z "${BW_CLUSTER_DIR:-}" && -z "${BW_CLUSTER_KEEP:-}" ]]; then
        rm -rf "$dir"
        rm -f "$STATE"
    fi
}

cmd_status() {
    local dir
    dir=$(cluster_dir) || { say "no cluster recorded"; return 1; }
    local up=0
    for n in $(seq $NODES); do
        local pid
        pid=$(node_pid "$dir" "$n" || true)
        if alive "$pid"; then
            echo "$(node_name "$n") pid $pid amqp 127.0.0.1:$(amqp_port "$n") up"
            up=$((up + 1))
        else
            echo "$(node_name "$n") amqp 127.0.0.1:$(amqp_port "$n") down"
        fi
    done
    for n in $(seq $NODES); do
        if alive "$(node_pid "$dir" "$n" || true)"; then
            echo "running nodes (seen from $(node_name "$n")): $(ctl "$dir" "$n" eval 'rabbit_nodes:all_running().' 2>/dev/null | tr -d '\n')"
            break
        fi
    done
    [[ $up -gt 0 ]]
}

cmd_env() {
    local urls=()
    for n in $(seq $NODES); do
        urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f")
    done
    local IFS=,
    echo "BW_CLUSTER_URLS=${urls[*]}"
}

check_n() {
    [[ "${1:-}" =~ ^[1-3]$ ]] || { say "node number 1..$NODES expected"; exit 2; }
}

cmd_kill9() {
    check_n "${1:-}"
    local dir pid
    dir=$(cluster_dir)
    pid=$(node_pid "$dir" "$1" || true)
    alive "$pid" || { say "node $1 is not running"; exit 1; }
    kill -KILL "$pid"
    for _ in $(seq 50); do
        alive "$pid" || break
        sleep 0.1
    done
    say "killed -9 $(node_name "$1") (pid $pid)"
}

cmd_restart() {
    check_n "${1:-}"
    local dir
    dir=$(cluster_dir)
    if alive "$(node_pid "$dir" "$1" || true)"; then
        say "node $1 is running"
        return 0
    fi
    launch "$dir" "$1"
    await_node "$dir" "$1" 120
    wait_port "$(amqp_port "$1")" 60
    # await_startup returns once the node has synced with the cluster; check that another
    # running node counts it among the running members.
    local other=""
    for m in $(seq $NODES); do
        if [[ $m != "$1" ]] && alive "$(node_pid "$dir" "$m" || true)"; then
            other=$m
            break
        fi
    done
    if [[ -z "$other" ]]; then
        say "$(node_name "$1") started (no other node runs to confirm membership)"
        return 0
    fi
    for _ in $(seq 100); do
        if ctl "$dir" "$other" eval 'rabbit_nodes:all_running().' 2>/dev/null | grep -q "bw$1@localhost"; then
            say "$(node_name "$1") rejoined (seen from $(node_name "$other"))"
            return 0
        fi
        sleep 0.3
    done
    say "$(node_name "$1") started but is not among the running nodes"
    return 1
}

cmd_watchdog() {
    local ttl=$1 dir=$2
    sleep "$ttl" &
    local sleeper=$!
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    wait "$sleeper" || exit 0
    say "watchdog: TTL of ${ttl}s reached, stopping the cluster in $dir"
    BW_WATCHDOG_SELF=$$ BW_CLUSTER_DIR="$dir" BW_CLUSTER_KEEP=1 cmd_stop
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    kill9) cmd_kill9 "${2:-}" ;;
    restart) cmd_restart "${2:-}" ;;
    pid) check_n "${2:-}"; node_pid "$(cluster_dir)" "$2"; echo ;;
    _watchdog) cmd_watchdog "$2" "$3" ;;
    *)
        sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
