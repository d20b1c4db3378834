#!/usr/bin/env bash
# Runs every test of the workspace:
#   1. fetches the default model and gemma3-270m into models/cache/ (once; cached
#      afterwards),
#   2. cargo test: unit tests, fidelity and engine tests, HTTP integration tests (real model),
#   3. the official `openai` Python SDK against a real chorus on a free loopback port
#      (installed into .venv/ from tests/sdk/requirements.txt when absent),
#   4. the chat page in headless Chromium against the same server (Debian's chromium and
#      playwright-core from npm, installed when absent).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== models"
cargo run --release --quiet -p chorus-server -- --download-only
target/release/chorus models pull gemma3-270m

echo "== cargo test"
cargo test --release --workspace

echo "== openai SDK tests"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import openai, pytest' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
fi
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
target/release/chorus --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
  if python3 -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:$port/health').status == 200 else 1)" 2>/dev/null; then
    break
  fi
  if ! kill -0 $server 2>/dev/null; then
    echo "chorus exited before it was ready:"; cat "$log"; exit 1
  fi
  sleep 0.2
done
CHORUS_URL="http://127.0.0.1:$port" .venv/bin/python -m pytest -q tests/sdk

echo "== browser test"
if [ ! -x /usr/bin/chromium ]; then
  sudo_=""
  [ "$(id -u)" -ne 0 ] && sudo_="sudo"
  $sudo_ apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q chromium
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --no-audit --no-fund)
fi
CHORUS_URL="http://127.0.0.1:$port" node tests/browser/chat.test.mjs
