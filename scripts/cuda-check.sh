#!/usr/bin/env bash
# CI's check of the `cuda` feature, on a machine without a GPU (issue 16):
#   1. CUDA 13.0's compiler and libraries from PyPI wheels when absent (scripts/cuda-env.sh,
#      ~1.2 GB, cached in $CHORUS_CUDA_VENV or ~/.cache/chorus-cuda13);
#   2. the CUDA build of chorus-model's unit tests and of its device tests (the binary a GPU
#      session runs, scripts/device-pack.sh), and the kernel tests run: NVRTC compiles our
#      paged attention kernel for every head shape it serves, and ptxas assembles it for
#      sm_90 as the driver of an H100/H200 would. The driver library is a stub that lets
#      the test binaries load (only a GPU machine has the real one).
# chorus-model holds all the code behind the feature (chorus-server only forwards it and
# asks `cfg!`, which the default build compiles), so a CUDA path that stops compiling
# fails here. The target dir is the default build's: what differs (candle, what depends
# on it, what cargo unifies differently for one package) builds again, candle's CUDA
# kernels once per target dir: ~15 minutes on 2 cores after the default build, 10 of
# them candle's nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
cargo fetch --quiet
# Apart from the eval, so that a failed install stops the script here.
cuda_env=$(scripts/cuda-env.sh)
eval "$cuda_env"
# scripts/cuda-env.sh puts its links folder (the libraries and the driver stub) first.
links=${LIBRARY_PATH%%:*}
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
ln -s "$links/libcuda.so" "$stub/libcuda.so.1"
echo "cuda-check: toolchain ready after $((SECONDS - started)) s; building with --features cuda" >&2
# chorus-model builds in one codegen unit for the CPU kernels' speed (Cargo.toml); this
# check times nothing, so it takes 16: its three builds of the crate took 3.5 minutes on
# 2 cores with one, about 1 with 16.
LD_LIBRARY_PATH="$stub:$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --release --features cuda -p chorus-model --lib --test device \
    --config 'profile.release.package.chorus-model.codegen-units=16' device::cuda
echo "cuda-check: passed in $((SECONDS - started)) s" >&2
