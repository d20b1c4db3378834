#!/usr/bin/env bash
# Prepares .device/ (ignored by git) for scripts/device-check.sh on a GPU machine, which
# has no Rust and no network: the CUDA build of chorus, the CUDA build of the device
# tests and of chorus-model's unit tests, chorus-bench, the Python `gguf` package and a
# small GGUF whose tokenizer the 1B-shape random model reuses. Everything travels compressed; the device tool carries
# at most 64 MiB. Then, with the device tool: run `bash scripts/device-check.sh` with
# carry [".device"].
#
#   scripts/device-pack.sh            # CUDA build (needs scripts/cuda-env.sh's toolchain)
#   scripts/device-pack.sh --cpu      # the default build, to exercise the check here:
#                                     # CHORUS_CHECK_DEVICE=candle-cpu scripts/device-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
features=(--features cuda)
target=${CHORUS_CUDA_TARGET:-target-cuda}
if [ "${1:-}" = --cpu ]; then
  features=()
  target=target
else
  cargo fetch --quiet
  cuda_env=$(scripts/cuda-env.sh) # apart from the eval: a failure stops here
  eval "$cuda_env"
fi
export CARGO_TARGET_DIR=$target
rm -rf .device && mkdir -p .device/py
echo "device-pack: building chorus and the tests ${features[*]}" >&2
# The artifacts' paths: the test binaries' names carry a hash.
executable() {
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
}
# One invocation for chorus and the device tests, so that cargo unifies features once and
# candle's CUDA kernels compile once per target dir; then chorus-model's unit tests (a
# kernel's GPU test is one of them), which reuse them.
device_tests=$(cargo build --release "${features[@]}" -p chorus-server -p chorus-model --bin chorus \
  --test device --message-format=json | executable device)
unit_tests=$(cargo test --no-run --release "${features[@]}" -p chorus-model --lib \
  --message-format=json | executable chorus_model)
cargo build --release -p chorus-bench
pack() { strip -o ".device/$2" "$1" && gzip -f ".device/$2"; }
pack "$target/release/chorus" chorus
pack "$device_tests" device-tests
pack "$unit_tests" unit-tests
pack "$target/release/chorus-bench" chorus-bench
# The gguf package is pure Python; numpy, pyyaml and tqdm are in the GPU machine's image.
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install --quiet gguf==0.19.0 numpy; }
cp -r "$(.venv/bin/python -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')" .device/py/
find .device/py -name __pycache__ -prune -exec rm -rf {} +
# The tokenizer donor: the default model's tokenizer with the smallest weights.
[ -f models/cache/SmolLM2-135M-Instruct.Q4_1.gguf ] || cargo run --release -p chorus-server -- --download-only
.venv/bin/python scripts/random-gguf.py --hidden 64 --layers 1 --heads 2 --kv-heads 1 --ffn 64 \
  --out .device/tokenizer.gguf >/dev/null
gzip -f .device/tokenizer.gguf
du -sh .device/* >&2
echo "device-pack: $(du -sm .device | cut -f1) MiB in .device/" >&2
