// Decode attention over the paged KV cache, reading every key and value where it lies:
// no gather, no padding, no mask. One thread block per (sequence, KV head) computes the
// GROUP query heads that share that KV head, so each key and value is read once.
//
// Compiled at run time by NVRTC for one model (`PagedKernel::compile`), with:
//   HEAD_DIM    values per head (even)
//   GROUP       query heads per KV head
//   THREADS     threads per block: a multiple of HEAD_DIM / 2 (see `threads_for`)
//   BLOCK_SIZE  positions per cache block
//   CACHE_BF16  1 if the cache holds bf16, 0 for f16
// The same source compiles as C++ for the host (CHORUS_HOST_EMULATION, host_emulation.cpp)
// so that its tests run on a CPU, with a thread per CUDA thread and a barrier.
//
// The positions lo..ctx are walked in tiles of THREADS with an online softmax:
//   1. scores: thread t scores position start + t against the GROUP queries;
//   2. the tile's maximum per head (a tree in shared memory), the running maximum, and
//      the rescaling of what was summed so far;
//   3. values: thread t owns the value pair 2 * (t % PAIRS) and every SPLITS-th position
//      of the tile, so a warp reads consecutive values of one position.
// At the end the partial sums and the SPLITS partial outputs are added up.

#define PAIRS (HEAD_DIM / 2)
#define SPLITS (THREADS / PAIRS)
#define TILE THREADS

#ifndef CHORUS_HOST_EMULATION
__device__ __forceinline__ float f16_bits_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ float bits_to_float(unsigned u) { return __uint_as_float(u); }
#endif

__device__ __forceinline__ float cache_to_float(unsigned bits) {
#if CACHE_BF16
  return bits_to_float(bits << 16);
#else
  return f16_bits_to_float((unsigned short)bits);
#endif
}

// Adds the GROUP queries' products with the key pair in `w` (dimensions d, d + 1) to `s`.
__device__ __forceinline__ void score_pair(unsigned w, unsigned d, const float (*sq)[HEAD_DIM],
                                           float* s) {
  const float k0 = cache_to_float(w & 0xffffu), k1 = cache_to_float(w >> 16);
  #pragma unroll
  for (unsigned g = 0; g < GROUP; ++g) s[g] += sq[g][d] * k0 + sq[g][d + 1] * k1;
}

// Adds the GROUP queries' products with the key at `k` (HEAD_DIM cache values) to `s`.
__device__ __forceinline__ void score(const unsigned short* __restrict__ k,
                                      const float (*sq)[HEAD_DIM], float* s) {
#if HEAD_DIM % 8 == 0
  const uint4* k8 = (const uint4*)k;
#pragma unroll
  for (unsigned c = 0; c < HEAD_DIM / 8; ++c) {
    const uint4 w = k8[c];
    score_pair(w.x, 8 * c, sq, s);
    score_pair(w.y, 8 * c + 2, sq, s);
    score_pair(w.z, 8 * c + 4, sq, s);
    score_pair(w.w, 8 * c + 6, sq, s);
  }
#else
  const unsigned* k2 = (const unsigned*)k;
#pragma unroll
  for (unsigned c = 0; c < PAIRS; ++c) score_pair(k2[c], 2 * c, sq, s);
#endif
}

// Reduces red[g][0..THREADS) into red[g][0] with `max` (is_max) or `+`, for every head.
__device__ __forceinline__ void block_reduce(float (*red)[TILE], unsigned t, bool is_max) {
  unsigned span = 1;
  while (span < THREADS) span <<= 1;
  for (unsigned w = span / 2; w > 0; w >>= 1) {
    if (t < w && t + w < THREADS) {
      #pragma unroll
      for (unsigned g = 0; g < GROUP; ++g) {
        const float a = red[g][t], b = red[g][t + w];
        red[g][t] = is_max ? fmaxf(a, b) : a + b;
      }
    }
    __syncthreads();
  }
}

// out, q: [n, kv_heads * GROUP * HEAD_DIM] f32, q with its rotary embedding.
// keys, values: [slots, kv_heads * HEAD_DIM], the layer's cache (slot = block *
//   BLOCK_SIZE + offset).
// meta: [n, meta_stride] u32: the number of positions the row sees (its own included),
//   the first position it sees (after a sliding window), then its block table.
extern "C" __global__ void __launch_bounds__(THREADS)
    paged_decode_attention(float* __restrict__ out, const float* __restrict__ q,
                           const unsigned short* __restrict__ keys,
                           const unsigned short* __restrict__ values,
                           const unsigned* __restrict__ meta, unsigned meta_stride,
                           unsigned kv_heads, float scale) {
  __shared__ float sq[GROUP][HEAD_DIM];
  __shared__ float sp[GROUP][TILE];
  __shared__ float red[GROUP][TILE];
  __shared__ unsigned sslot[TILE];
  __shared__ float racc[SPLITS][GROUP][HEAD_DIM];

  const unsigned seq = blockIdx.x, kvh = blockIdx.y, t = threadIdx.x;
  const unsigned q_dim = kv_heads * GROUP * HEAD_DIM, kv_dim = kv_heads * HEAD_DIM;
  const unsigned* m = meta + (unsigned long long)seq * meta_stride;
  const unsigned ctx = m[0], lo = m[1];
  const unsigned* table = m + 2;
  const float* qs = q + (unsigned long long)seq * q_dim + kvh * GROUP * HEAD_DIM;
  const float neg_inf = bits_to_float(0xff800000u);

  for (unsigned i = t; i < GROUP * HEAD_DIM; i += THREADS) sq[i / HEAD_DIM][i % HEAD_DIM] = qs[i] * scale;
  const unsigned pair = t % PAIRS, split = t / PAIRS;
  float run_max[GROUP], part_sum[GROUP], acc[GROUP][2];
  #pragma unroll
  for (unsigned g = 0; g < GROUP; ++g) {
    run_max[g] = neg_inf;
    part_sum[g] = 0.f;
    acc[g][0] = acc[g][1] = 0.f;
  }
  __syncthreads();

  for (unsigned start = lo; start < ctx; start += TILE) {
    const unsigned p = start + t;
    const bool valid = p < ctx;
    float s[GROUP];
    #pragma unroll
    for (unsigned g = 0; g < GROUP; ++g) s[g] = valid ? 0.f : neg_inf;
    if (valid) {
      const unsigned slot = table[p / BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE;
      sslot[t] = slot;
      score(keys + (unsigned long long)slot * kv_dim + kvh * HEAD_DIM, sq, s);
    }
    #pragma unroll
    for (unsigned g = 0; g < GROUP; ++g) red[g][t] = s[g];
    __syncthreads();
    block_reduce(red, t, true);
    #pragma unroll
    for (unsigned g = 0; g < GROUP; ++g) {
      // The tile holds at least one visible position (start < ctx), so mx is finite.
      const float mx = fmaxf(run_max[g], red[g][0]);
      const float alpha = expf(run_max[g] - mx);
      run_max[g] = mx;
      const float e = valid ? expf(s[g] - mx) : 0.f;
      part_sum[g] = part_sum[g] * alpha + e;
      acc[g][0] *= alpha;
      acc[g][1] *= alpha;
      sp[g][t] = e;
    }
    __syncthreads();
    const unsigned n = ctx - start < TILE ? ctx - start : TILE;
    for (unsigned j = split; j < n; j += SPLITS) {
      const unsigned w = *(const unsigned*)(values + (unsigned long long)sslot[j] * kv_dim +
                                            kvh * HEAD_DIM + 2 * pair);
      const float v0 = cache_to_float(w & 0xffffu), v1 = cache_to_float(w >> 16);
      #pragma unroll
      for (unsigned g = 0; g < GROUP; ++g) {
        acc[g][0] += sp[g][j] * v0;
        acc[g][1] += sp[g][j] * v1;
      }
    }
    // The next tile rewrites sp, sslot and red.
    __syncthreads();
  }

  #pragma unroll
  for (unsigned g = 0; g < GROUP; ++g) {
    red[g][t] = part_sum[g];
    racc[split][g][2 * pair] = acc[g][0];
    racc[split][g][2 * pair + 1] = acc[g][1];
  }
  __syncthreads();
  block_reduce(red, t, false);
  float* os = out + (unsigned long long)seq * q_dim + kvh * GROUP * HEAD_DIM;
  for (unsigned i = t; i < GROUP * HEAD_DIM; i += THREADS) {
    const unsigned g = i / HEAD_DIM, d = i % HEAD_DIM;
    float a = 0.f;
    for (unsigned sp_i = 0; sp_i < SPLITS; ++sp_i) a += racc[sp_i][g][d];
    os[i] = a / red[g][0];
  }
}
