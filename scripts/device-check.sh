#!/usr/bin/env bash
# The GPU checks of issue 16, run on the GPU machine from the repository root over what
# scripts/device-pack.sh put in .device/ (that machine has no Rust and no network):
#
#   1. the device tests on CUDA: every architecture's tiny model in f32, bf16 and f16 against
#      the packed CPU path, alone and batched with chunked prefill (batch invariance),
#      every row's logits, a copied block, greedy rows' argmax found on the device; and
#      the kernels' GPU unit tests (the KV write against its reference, bit for bit);
#   2. a random-weight GGUF of a 1B shape (hidden 2048, 16 layers, 32/8 heads, ffn 8192),
#      written there by scripts/random-gguf.py with the carried tokenizer;
#   3. chorus --device cuda on it, with dense bf16 weights and decoding rows through our
#      paged kernel, steps replayed as CUDA graphs (the defaults); the same without
#      graphs; decoding rows through the gather (no graphs: they need the kernel); and
#      --device-weights auto (both the dense and the GGUF-block forms, each step the one
#      timed faster at start for its size: the log has those timings) with graphs.
#      chorus-bench at 1/32/128/256 streams against each, and scripts/step-profile.py's
#      summary of each server's per-step log (where a step's time goes: fixed cost, per
#      decode token, per thousand attended positions, the logits' copy back). Last, the
#      defaults with greedy rows' logits copied to the host (--no-device-argmax) at 128
#      and 256 streams: what finding the argmax on the device saves.
#
# Results land in $OUT (the device tool's folder that comes back): summary.txt,
# bench-{dense,dense-eager,dense-gather,auto,dense-hostargmax}.json, and logs.tgz with every log (device tests, servers,
# benches, nvidia-smi). Without a GPU the same steps run on
# candle's CPU device with a small model and two short levels, to check the script:
#
#   scripts/device-pack.sh --cpu &&
#     CHORUS_CHECK_DEVICE=candle-cpu CHORUS_CHECK_PYTHON=.venv/bin/python scripts/device-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
# The device tool brings back at most 8 files from $OUT: the logs go in one archive.
result=${OUT:-/tmp/chorus-device-check}
out=$(mktemp -d)
mkdir -p "$result"
device=${CHORUS_CHECK_DEVICE:-cuda}
work=${TMPDIR:-/tmp}/chorus-device
mkdir -p "$work/bin"
# The summary and the benches' JSON go straight to $result, so that a run cut short by
# the device tool's time limit still brings back what it measured.
summary=$result/summary.txt
: >"$summary"
log() { echo "== $(date +%T) $*" | tee -a "$summary"; }
health() {
  python3 -c 'import sys, urllib.request
print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5).read().decode())' "$1" 2>/dev/null
}

if [ "$device" = cuda ]; then
  # CUDA's libraries come with the machine's PyTorch (site-packages/nvidia/*/lib).
  libs=$(python3 -c 'import glob, os, sys
roots = [p for p in sys.path if p.endswith("site-packages")]
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "**", "lib"), recursive=True)})))')
  # The CUDA toolkit's own folder last: NVRTC loads its builtins library from the path.
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/usr/local/cuda/lib64"
  nvidia-smi >"$out/gpu.txt" 2>&1
  # CUDA 13.0 built the binary: a driver older than the 580 series loads none of its kernels.
  grep -m1 -o 'Driver Version: [0-9.]*.*CUDA Version: [0-9.]*' "$out/gpu.txt" | tee -a "$summary"
  shape=()
  levels=1,32,128,256
  duration=10
  server_flags=(--max-running 256 --max-batch-tokens 4096 --kv-cache-mb 16384)
  export CHORUS_TEST_CUDA=1
else
  shape=(--hidden 256 --layers 2 --heads 4 --kv-heads 2 --ffn 512)
  levels=1,4
  duration=5
  server_flags=(--max-running 8)
fi
for f in chorus device-tests unit-tests chorus-bench; do
  gunzip -c ".device/$f.gz" >"$work/bin/$f" && chmod +x "$work/bin/$f"
done
gunzip -c .device/tokenizer.gguf.gz >"$work/tokenizer.gguf"

# A library the binary cannot find stops it before main: say which.
ldd "$work/bin/chorus" | grep 'not found' | tee -a "$summary"
log "1. device tests ($device)"
# The real-model test needs the default model's file, which does not travel.
# Time limits on each part, so that a hang (a GPU fault, say) still leaves time for the rest.
timeout "${CHORUS_CHECK_TESTS_S:-200}" "$work/bin/device-tests" --test-threads 1 --skip the_real_model --nocapture \
  >"$out/device-tests.log" 2>&1
tests_rc=$?
grep -E '^test |test result|panicked|from the packed path|of eager ones' "$out/device-tests.log" | tee -a "$summary"
# The kernels' GPU unit tests (the KV write against its reference, bit for bit).
timeout 60 "$work/bin/unit-tests" --test-threads 1 --nocapture on_a_gpu >"$out/unit-tests.log" 2>&1 ||
  tests_rc=1
grep -E '^test |test result|panicked|skipped' "$out/unit-tests.log" | tee -a "$summary"

log "2. random model"
PYTHONPATH=.device/py "${CHORUS_CHECK_PYTHON:-python3}" scripts/random-gguf.py --tokenizer-from "$work/tokenizer.gguf" \
  "${shape[@]}" --out "$work/model.gguf" >"$out/model.log" 2>&1 || { tail "$out/model.log"; exit 1; }

port=18031
bench_rc=0
# In order of what the issue asks first, so that a run cut short keeps the most: dense
# bf16 weights through cuBLAS with our paged kernel and steps replayed as CUDA graphs (the
# defaults); both weight forms, dense and the GGUF blocks through candle's quantized
# kernels, chosen per step size (the issue asks which wins at which batch size: the server
# times both at 1, 2, 4, ... rows at start and logs it); the gather instead of the paged
# kernel; the paged kernel launched op by op; last, the defaults with every greedy row's
# logits copied back to the host (--no-device-argmax), at the levels where that copy can
# show: what the argmax on the device saves. Each config: name:attention:graph rows.
# CHORUS_CHECK_CONFIGS picks some of them (a second call in a short lease, say).
configs=${CHORUS_CHECK_CONFIGS:-dense:paged:512 auto:paged:512 dense-gather:gather:0 \
  dense-eager:paged:0 dense-hostargmax:paged:512}
for config in $configs; do
  name=${config%%:*}
  weights=${name%%-*}
  rest=${config#*:}
  attention=${rest%%:*}
  graphs=${rest##*:}
  extra=()
  config_levels=$levels
  if [ "$name" = dense-hostargmax ]; then
    extra=(--no-device-argmax)
    config_levels=${levels##*,}
    [ "$device" = cuda ] && config_levels=128,256
  fi
  log "3. server --device-weights $weights --device-attention $attention --cuda-graph-max-batch $graphs ${extra[*]}, and bench"
  # The per-step log says where a step's time goes (scripts/step-profile.py).
  RUST_LOG=info,chorus::step=debug CHORUS_LOG_FORMAT=json \
    "$work/bin/chorus" --model "$work/model.gguf" --device "$device" --port "$port" \
    --device-weights "$weights" --device-attention "$attention" \
    --cuda-graph-max-batch "$graphs" "${server_flags[@]}" "${extra[@]}" \
    >"$out/server-$name.log" 2>&1 &
  server=$!
  for _ in $(seq 120); do
    health "$port" >"$out/health.json" && break
    kill -0 "$server" 2>/dev/null || break
    sleep 1
  done
  cat "$out/health.json" | tee -a "$summary"; echo | tee -a "$summary"
  grep -E 'model loaded|paged attention|device weights|CUDA graph' "$out/server-$name.log" | head -n 20 | sed 's/\x1b\[[0-9;]*m//g' | tee -a "$summary"
  if health "$port" >/dev/null; then
    timeout 150 "$work/bin/chorus-bench" --url "http://127.0.0.1:$port" --concurrency "$config_levels" \
      --duration "$duration" --json "$result/bench-$name.json" >"$out/bench-$name.log" 2>&1 ||
      bench_rc=1
    tail -n 6 "$out/bench-$name.log" | tee -a "$summary"
    python3 scripts/step-profile.py "$out/server-$name.log" 2>&1 | tee -a "$summary"
    echo "CUDA graphs captured: $(grep -c 'captured a CUDA graph' "$out/server-$name.log")" | tee -a "$summary"
    grep 'CUDA graphs failed' "$out/server-$name.log" | head -n 3 | sed 's/\x1b\[[0-9;]*m//g' | tee -a "$summary"
  else
    bench_rc=1
    log "the server did not come up"; tail -n 30 "$out/server-$name.log" | tee -a "$summary"
  fi
  kill "$server" 2>/dev/null
  for _ in $(seq 10); do kill -0 "$server" 2>/dev/null || break; sleep 1; done
  kill -9 "$server" 2>/dev/null; wait "$server" 2>/dev/null
  port=$((port + 1))
done
log "done: tests rc $tests_rc, bench rc $bench_rc"
tar -czf "$result/logs.tgz" -C "$out" .
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
