#!/usr/bin/env bash
# scripts/cluster.sh N [chorus flags...]
#
# Starts N chorus workers and one smg router (Shepherd Model Gateway, cache-aware by
# default) in front of them, all on loopback. Waits until the router reports every worker
# ready, then prints the router's URL (http://127.0.0.1:PORT) on standard output and runs
# until ctrl-c (or SIGTERM), which stops everything. Progress and the router's address go
# to standard error; logs and the worker list are in $CLUSTER_DIR.
#
# The chorus flags go to every worker (--port and --state-dir are set per worker). With
# an API key (--api-key, or CHORUS_API_KEY), the router is given it too: smg then asks it
# of clients and sends it to the workers (their /v1/models, which it discovers them by,
# is behind the key). smg takes the key only as a flag: it shows in the process list.
# Environment:
#   CLUSTER_POLICY   the router's --policy (cache_aware; round_robin, power_of_two, ...)
#   CLUSTER_HOST     address every process binds (127.0.0.1)
#   CLUSTER_PORT     the router's port (a free one)
#   CLUSTER_DIR      logs, `workers` (one "URL PID" line each), workers' state dirs
#                    (a temporary directory, removed on exit, unless given)
#   CLUSTER_TIMEOUT  seconds to wait for the cluster to be ready (300)
#   CHORUS_BIN       the chorus binary (target/release/chorus, built when absent)
#   SMG_ARGS         more flags for the router, e.g. "--health-check-interval-secs 2"
# smg is installed into .venv/ from scripts/router-requirements.txt (pinned) when absent.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: scripts/cluster.sh N [chorus flags...]"
n=${1:?$usage}
shift
if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
  echo "$usage (N, the number of workers, must be a positive integer; got '$n')" >&2
  exit 2
fi
policy=${CLUSTER_POLICY:-cache_aware}
host=${CLUSTER_HOST:-127.0.0.1}
timeout=${CLUSTER_TIMEOUT:-300}
chorus=${CHORUS_BIN:-target/release/chorus}
say() { echo "cluster: $*" >&2; }

if [ -n "${CLUSTER_DIR:-}" ]; then
  dir=$CLUSTER_DIR
  mkdir -p "$dir"
  keep_dir=1
else
  dir=$(mktemp -d)
  keep_dir=0
fi
: >"$dir/workers"

pids=()
stop() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -gt 0 ] && say "stopping"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  [ "$keep_dir" = 0 ] && rm -rf "$dir"
  exit "${1:-0}"
}
trap 'stop $?' EXIT
trap 'stop 130' INT
trap 'stop 143' TERM

if [ ! -x "$chorus" ]; then
  say "building chorus (cargo build --release)"
  cargo build --release -p chorus-server >&2
fi
if [ ! -x .venv/bin/smg ]; then
  say "installing smg into .venv/ (scripts/router-requirements.txt)"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check \
    -r scripts/router-requirements.txt >&2
fi
# Fetch the model once, before N workers would each try to.
"$chorus" --download-only "$@" >&2

free_port() {
  python3 -c 'import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$host"
}
# The workers' API key, if they are given one.
key=${CHORUS_API_KEY:-}
args=("$@")
for i in "${!args[@]}"; do
  case ${args[$i]} in
    --api-key) key=${args[$((i + 1))]:-} ;;
    --api-key=*) key=${args[$i]#--api-key=} ;;
  esac
done
router_key=()
[ -n "$key" ] && router_key=(--api-key "$key")

# get URL: the body of a 2xx answer from URL (asked with the key, if any), or nothing.
get() {
  CLUSTER_KEY=$key python3 - "$1" <<'PY' 2>/dev/null || true
import os, sys, urllib.request
request = urllib.request.Request(sys.argv[1])
if os.environ["CLUSTER_KEY"]:
    request.add_header("Authorization", "Bearer " + os.environ["CLUSTER_KEY"])
try:
    print(urllib.request.urlopen(request, timeout=2).read().decode())
except Exception:
    pass
PY
}

urls=()
for i in $(seq 1 "$n"); do
  port=$(free_port)
  "$chorus" --host "$host" --port "$port" --state-dir "$dir/worker-$i" "$@" \
    >"$dir/worker-$i.log" 2>&1 &
  pids+=("$!")
  urls+=("http://$host:$port")
  echo "http://$host:$port $!" >>"$dir/workers"
done
say "$n workers starting: ${urls[*]} (logs in $dir)"

# check_alive WHAT: fails the script if a started process has exited.
check_alive() {
  for p in "${pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      say "a process exited while waiting for $1; logs in $dir:"
      tail -n 20 "$dir"/*.log >&2
      keep_dir=1
      exit 1
    fi
  done
}
deadline=$((SECONDS + timeout))
# wait_for WHAT COMMAND...: runs COMMAND, which prints how many of the N are ready, until
# it prints N, saying so at each change; gives up at the deadline or when a process exits.
wait_for() {
  local what=$1 last="" ready
  shift
  while :; do
    check_alive "$what"
    ready=$("$@")
    if [ "$ready" != "$last" ]; then
      say "$what: $ready of $n ready"
      last=$ready
    fi
    [ "$ready" = "$n" ] && return
    if [ $SECONDS -ge $deadline ]; then
      say "$what: not ready after ${timeout} s; logs in $dir"
      keep_dir=1
      exit 1
    fi
    sleep 0.3
  done
}
workers_loaded() {
  local k=0
  for u in "${urls[@]}"; do
    [ -n "$(get "$u/health")" ] && k=$((k + 1))
  done
  echo "$k"
}
router_ready() {
  get "$router/workers" | python3 -c '
import json, sys
try:
    workers = json.load(sys.stdin)["workers"]
except Exception:
    workers = []
print(sum(1 for w in workers if w.get("is_healthy") and w.get("status") == "ready"))'
}
# The router probes each worker once at start and retries only after 30 s: start it
# when every worker answers /health (the model is loaded).
wait_for "workers (model loaded)" workers_loaded

router_port=${CLUSTER_PORT:-$(free_port)}
metrics_port=$(free_port)
# shellcheck disable=SC2086 # SMG_ARGS is a list of flags
.venv/bin/smg launch --host "$host" --port "$router_port" --worker-urls "${urls[@]}" \
  --policy "$policy" --prometheus-host "$host" --prometheus-port "$metrics_port" \
  ${router_key[@]+"${router_key[@]}"} ${SMG_ARGS:-} >"$dir/router.log" 2>&1 &
pids+=("$!")
router_pid=$!
router="http://$host:$router_port"

wait_for "router (workers registered)" router_ready
say "router $router (policy $policy, Prometheus on http://$host:$metrics_port/metrics); ctrl-c stops"
echo "$router"
wait "$router_pid"
