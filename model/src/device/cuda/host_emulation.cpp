// Runs paged_attention.cu on the host so that its tests need no GPU: every CUDA thread of
// a block is a host thread, __syncthreads() a barrier among them, __shared__ arrays are
// function statics (the blocks run one after another, so one copy serves each block).
// Built by the kernel's tests with the same -D constants as NVRTC gets:
//
//   c++ -std=c++17 -O1 -pthread -DCHORUS_HOST_EMULATION -DHEAD_DIM=.. -DGROUP=..
//       -DTHREADS=.. -DBLOCK_SIZE=.. -DCACHE_BF16=.. host_emulation.cpp
//
// Input on stdin (little-endian): u32 n, kv_heads, meta_stride, slots; f32 scale;
// then q (f32), keys and values (u16), meta (u32). Output on stdout: out (f32).

#include <pthread.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
struct uint4 {
  unsigned x, y, z, w;
};
static thread_local dim3 threadIdx;
static dim3 blockIdx;
static pthread_barrier_t barrier;

static inline void __syncthreads() { pthread_barrier_wait(&barrier); }
static inline float bits_to_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float f16_bits_to_float(unsigned short h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return static_cast<float>(x);
}

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

#include "paged_attention.cu"

struct Args {
  float* out;
  const float* q;
  const unsigned short* keys;
  const unsigned short* values;
  const unsigned* meta;
  unsigned meta_stride, kv_heads;
  float scale;
  unsigned thread;
};

static void* run_thread(void* p) {
  const Args* a = static_cast<const Args*>(p);
  threadIdx.x = a->thread;
  paged_decode_attention(a->out, a->q, a->keys, a->values, a->meta, a->meta_stride,
                         a->kv_heads, a->scale);
  return nullptr;
}

template <typename T>
static bool read(std::vector<T>& v, size_t n) {
  v.resize(n);
  return std::fread(v.data(), sizeof(T), n, stdin) == n;
}

int main() {
  unsigned head[4];
  float scale;
  if (std::fread(head, 4, 4, stdin) != 4 || std::fread(&scale, 4, 1, stdin) != 1) return 2;
  const unsigned n = head[0], kv_heads = head[1], meta_stride = head[2], slots = head[3];
  const size_t q_dim = size_t(kv_heads) * GROUP * HEAD_DIM, kv_dim = size_t(kv_heads) * HEAD_DIM;
  std::vector<float> q, out(n * q_dim, std::nanf(""));
  std::vector<unsigned short> keys, values;
  std::vector<unsigned> meta;
  if (!read(q, n * q_dim) || !read(keys, slots * kv_dim) || !read(values, slots * kv_dim) ||
      !read(meta, size_t(n) * meta_stride))
    return 2;
  std::vector<pthread_t> threads(THREADS);
  std::vector<Args> args(THREADS);
  for (unsigned s = 0; s < n; ++s) {
    for (unsigned h = 0; h < kv_heads; ++h) {
      blockIdx.x = s;
      blockIdx.y = h;
      pthread_barrier_init(&barrier, nullptr, THREADS);
      for (unsigned t = 0; t < THREADS; ++t) {
        args[t] = Args{out.data(), q.data(), keys.data(), values.data(), meta.data(),
                       meta_stride, kv_heads, scale, t};
        if (pthread_create(&threads[t], nullptr, run_thread, &args[t]) != 0) return 3;
      }
      for (unsigned t = 0; t < THREADS; ++t) pthread_join(threads[t], nullptr);
      pthread_barrier_destroy(&barrier);
    }
  }
  return std::fwrite(out.data(), 4, out.size(), stdout) == out.size() ? 0 : 4;
}
