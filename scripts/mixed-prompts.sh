#!/usr/bin/env bash
# Short prompts beside long ones: what the prefill order decides. Two streams loop
# 6,000-word prompts (16 output tokens each); eight seconds in, one stream sends 80-word
# chats (32 tokens) for 50 s. The short stream's TTFT is the figure; the long streams'
# TTFT shows what serving the short ones first costs them.
#
#   scripts/mixed-prompts.sh URL OUT_PREFIX
#
# writes OUT_PREFIX-long.json and OUT_PREFIX-short.json (chorus-bench's JSON). Build
# chorus-bench first (`cargo build --release -p chorus-bench`).
set -euo pipefail
url=${1:?usage: mixed-prompts.sh URL OUT_PREFIX}
out=${2:?usage: mixed-prompts.sh URL OUT_PREFIX}
bench="$(dirname "$0")/../target/release/chorus-bench"
"$bench" --url "$url" --concurrency 2 --prompt-tokens 6000 --max-tokens 16 --duration 75 \
  --seed 1 --json "$out-long.json" > "$out-long.txt" 2>&1 &
long=$!
sleep 8
"$bench" --url "$url" --concurrency 1 --prompt-tokens 80 --max-tokens 32 --duration 50 \
  --seed 2 --warmup 0 --json "$out-short.json" | tail -n 2
wait "$long"
tail -n 2 "$out-long.txt"
