// Writes a step's new keys or values into the paged cache: value c of row r of `src`
// (f32, `kv_dim` values a row, rows `stride` apart) goes to value c of slot `slots[r]`
// of `cache` (16-bit values, `kv_dim` a slot; a slot past `cache_slots` is skipped, not
// written), rounded to the nearest value of the cache's type, ties to even, as candle's
// casts round. One thread a value, so the write is as wide as the step (candle's
// `scatter_set` walks the rows one after another in each of `kv_dim` threads).
//
// Compiled at run time by NVRTC once (`KvWriteKernel::compile`); no constants.

__device__ __forceinline__ unsigned short float_to_bf16(float f) {
  const unsigned u = __float_as_uint(f);
  // A NaN stays a (quiet) NaN: rounding its payload could carry into the exponent.
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ unsigned short float_to_f16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// One thread a value: row i / kv_dim, column i % kv_dim.
#define KV_WRITE(NAME, CONVERT)                                                          \
  extern "C" __global__ void NAME(unsigned short* __restrict__ cache,                    \
                                  const float* __restrict__ src,                          \
                                  const unsigned* __restrict__ slots, unsigned rows,      \
                                  unsigned kv_dim, unsigned stride, unsigned cache_slots) { \
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;                             \
    if (i >= rows * kv_dim) return;                                                       \
    const unsigned r = i / kv_dim, c = i % kv_dim, slot = slots[r];                       \
    if (slot >= cache_slots) return;                                                      \
    cache[(size_t)slot * kv_dim + c] = CONVERT(src[(size_t)r * stride + c]);              \
  }

KV_WRITE(kv_write_bf16, float_to_bf16)
KV_WRITE(kv_write_f16, float_to_f16)
