#!/usr/bin/env bash
# Prints the environment that builds chorus's `cuda` feature on a machine without a GPU,
# installing CUDA 13.0's compiler and libraries from PyPI wheels the first time:
#
#   cargo fetch && eval "$(scripts/cuda-env.sh)" && cargo build --release --features cuda
#
# - nvcc, ptxas and the headers come from nvidia-cuda-nvcc/-runtime/-crt/-cccl 13.0 (nvvm
#   pinned to the same release: a newer nvvm writes PTX the 13.0 ptxas rejects). 13.0
#   matches 580-series drivers.
# - The binary links cuBLAS, cuRAND, NVRTC and the runtime (from their wheels, through
#   unversioned links) and the driver's libcuda.so.1, which only a GPU machine has: here
#   the link uses a stub defining the driver functions cudarc declares; the real library
#   is loaded at run time.
# - CUDA_COMPUTE_CAP defaults to 90 (H100/H200); candle would otherwise ask nvidia-smi.
# - CUDAFORGE_THREADS defaults to every core: candle-kernels' build script (cudaforge)
#   runs nvcc on half the cores otherwise, one on 2 cores, and its quantized matmul
#   kernels are most of the CUDA build's time (12 of 17 minutes on 2 cores).
# Installs into $CHORUS_CUDA_VENV (default ~/.cache/chorus-cuda13, about 1.2 GB).
set -euo pipefail
venv=${CHORUS_CUDA_VENV:-$HOME/.cache/chorus-cuda13}
if [ ! -f "$venv/.installed" ]; then
  echo "cuda-env: installing CUDA 13.0 wheels into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 'nvidia-cuda-runtime==13.0.*' \
    'nvidia-cuda-crt==13.0.*' 'nvidia-cuda-cccl==13.0.*' 'nvidia-cublas==13.0.*' \
    'nvidia-cuda-nvrtc==13.0.*' nvidia-curand >&2
  touch "$venv/.installed"
fi
cu=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
links=$venv/links
mkdir -p "$links"
for lib in cublas cublasLt cudart nvrtc; do
  ln -sf "$cu/lib/lib$lib.so.13" "$links/lib$lib.so"
done
curand=$(ls "$cu"/lib/libcurand.so.* | head -n 1)
ln -sf "$curand" "$links/libcurand.so"
# The stub declares what the locked cudarc calls (a reused cargo cache may hold others).
locked=$(awk '$0 == "name = \"cudarc\"" { getline; gsub(/version = |"/, ""); print; exit }' \
  "$(dirname "$0")/../Cargo.lock" 2>/dev/null || true)
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-"${locked:-*}" 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$cudarc" ]; then
  echo "cuda-env: cudarc's source is not in cargo's registry: run 'cargo fetch' first" >&2
  exit 1
fi
if [ "$cudarc" != "$(cat "$links/.stub-from" 2>/dev/null)" ]; then
  grep -rhoE '\bfn cu[A-Z][A-Za-z0-9_]*' "$cudarc/src/driver/sys" | cut -c4- | sort -u |
    sed 's/.*/void &(void) {}/' >"$links/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$links/libcuda-stub.c" >&2
  echo "$cudarc" >"$links/.stub-from"
fi
cat <<ENV
export PATH="$cu/bin:\$PATH" CUDA_ROOT="$cu" CUDA_PATH="$cu" CUDA_HOME="$cu"
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90} NVCC_CCBIN=\${NVCC_CCBIN:-/usr/bin/g++}
export CUDAFORGE_THREADS=\${CUDAFORGE_THREADS:-\$(nproc)}
export LIBRARY_PATH="$links\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
ENV
