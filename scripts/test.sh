#!/usr/bin/env bash
# Runs every test of the workspace:
#   1. builds the workspace and its tests (the `chorus` binary with them), and fetches the
#      default model and gemma3-270m into models/cache/ (once; cached afterwards),
#   2. cargo test: unit tests, fidelity and engine tests, HTTP integration tests (real model),
#   3. the official `openai` Python SDK against real chorus servers on free loopback ports,
#      one on the default model, one on gemma3-270m, one on the default model with a
#      Hermes tool-calling template and one with a thinking model's template (reasoning
#      returned apart), and the OpenAI Agents SDK and LangChain running tool
#      loops, on Chat Completions and on the Responses API (installed into .venv/ from
#      tests/sdk/requirements.txt when absent); stored responses across restarts and
#      kill -9 with servers of their own (tests/sdk/test_responses_store.py),
#   3b. three workers behind the smg router (scripts/cluster.sh, smg from
#      scripts/router-requirements.txt): routing, load balance, SIGKILL and SIGTERM of a
#      worker; the deploy/k8s/ manifests checked by kubernetes-validate,
#   4. the chat page in headless Chromium against both servers (and the thinking one:
#      reasoning in a block of its own), and against a third one
#      with --api-key and --cors-origin (the key prompt, and the official openai JS SDK
#      from another origin) (Debian's chromium, playwright-core and openai from npm,
#      installed when absent).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the Python, cluster and browser tests need is installed (when absent) in the
# background while the Rust side builds and runs: downloads, not the cores' work.
setup_log=$(mktemp)
install_test_tools() {
  if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/smg ] || ! .venv/bin/python -c 'import openai, pytest, jsonschema, jinja2, agents, langchain_openai, kubernetes_validate, gguf' 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
  fi
  if [ ! -d tests/browser/node_modules/playwright-core ] || [ ! -d tests/browser/node_modules/openai ]; then
    (cd tests/browser && npm ci --no-audit --no-fund --silent)
  fi
  # Without root, apt-get would ask for a password: that waits for the browser phase.
  if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" -eq 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium
  fi
}
install_test_tools >"$setup_log" 2>&1 &
setup_pid=$!
trap 'kill "$setup_pid" 2>/dev/null || true; rm -f "$setup_log"' EXIT
await_test_tools() {
  if ! wait "$setup_pid"; then
    echo "installing the test tools failed:"; cat "$setup_log"; exit 1
  fi
}

# One build, as the tests resolve features: `cargo run -p chorus-server` would resolve
# them without the workspace's dev-dependencies and build candle and chorus twice.
echo "== build ($SECONDS s)"
cargo test --release --workspace --no-run --quiet

echo "== models ($SECONDS s)"
target/release/chorus --download-only
target/release/chorus models pull gemma3-270m

echo "== cargo test ($SECONDS s)"
cargo test --release --workspace

echo "== openai SDK tests ($SECONDS s)"
await_test_tools
# start_server VAR ARGS...: runs chorus on a free port with ARGS, waits until it is
# ready, and sets VAR to its base URL. Servers are stopped on exit.
pids=()
logs=()
# Each server's stored responses (--state-dir) live under here for this run only.
state_root=$(mktemp -d)
trap 'rm -f "$setup_log"; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -f "${logs[@]}"; rm -rf "$state_root"' EXIT
start_server() {
  local var=$1; shift
  local port log pid
  port=$(free_port)
  log=$(mktemp)
  target/release/chorus --port "$port" --state-dir "$state_root/$port" "$@" >"$log" 2>&1 &
  pid=$!
  pids+=("$pid")
  logs+=("$log")
  for _ in $(seq 1 300); do
    if python3 -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$port/health').status == 200 else 1)" 2>/dev/null; then
      printf -v "$var" 'http://127.0.0.1:%s' "$port"
      return
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "chorus $* exited before it was ready:"; cat "$log"; exit 1
    fi
    sleep 0.2
  done
  echo "chorus $* was not ready after 60 s:"; cat "$log"; exit 1
}
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
page_port=$(free_port)
# A 2,048-token context: a prompt scored to its end (test_api_fields) costs ~10 s on 2
# cores, where the model's 8,192 cost 80-150 s.
start_server url --max-model-len 2048
start_server gemma_url --model gemma3-270m
start_server key_url --api-key test-key --cors-origin "http://127.0.0.1:$page_port"
start_server hermes_url --chat-template tests/sdk/templates/hermes-tools.jinja --served-model-name smollm2-hermes
start_server thinking_url --chat-template tests/sdk/templates/thinking.jinja --served-model-name smollm2-thinking --kv-cache-mb 256
CHORUS_URL="$url" CHORUS_GEMMA_URL="$gemma_url" CHORUS_HERMES_URL="$hermes_url" CHORUS_THINKING_URL="$thinking_url" CHORUS_BIN=target/release/chorus \
  .venv/bin/python -m pytest -q --durations=15 tests/sdk

echo "== cluster tests ($SECONDS s)"
# Three workers behind smg (scripts/cluster.sh), faults included; deploy/k8s/ manifests
# against the Kubernetes API schemas.
CHORUS_BIN=target/release/chorus .venv/bin/python -m pytest -q tests/cluster

echo "== browser test ($SECONDS s)"
if [ ! -x /usr/bin/chromium ]; then
  sudo_=""
  [ "$(id -u)" -ne 0 ] && sudo_="sudo"
  $sudo_ apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q chromium
fi
CHORUS_URL="$url" node tests/browser/chat.test.mjs
CHORUS_URL="$gemma_url" CHORUS_MODEL=gemma3-270m SCREENSHOT_DIR= node tests/browser/chat.test.mjs
CHORUS_URL="$key_url" CHORUS_KEY=test-key PAGE_PORT="$page_port" node tests/browser/key-and-cors.test.mjs
CHORUS_URL="$url" node tests/browser/scheduler.test.mjs
CHORUS_URL="$thinking_url" node tests/browser/reasoning.test.mjs
