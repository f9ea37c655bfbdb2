// centered_gram on CUDA: column means (fp64), then a tiled shared-memory Gram over the
// upper-triangle tile pairs only (the Gram is symmetric) and over column slices, then a
// finalise. Inputs fp32/fp16/bf16 (converted and centred on load); per-thread fp32 FMA
// accumulators are flushed into fp64 every kGFlush = 256 columns (as the CPU's kKBlock), each
// (pair, slice) block writes its fp64 partial tile with plain stores, and the finalise adds the
// slices of every entry in slice order: deterministic, no atomics. Partition: kernel_plan.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gram.h"
#include "kernel_plan.h"

namespace ompq {
namespace cuda {
namespace {

using plan::capped_blocks;
using plan::GramPlan;
constexpr int kTile = plan::kGTile;        // output tile (kTile × kTile)
constexpr int kK = plan::kGK;              // k steps per shared-memory stage
constexpr int kThreads = 16;               // threads per tile side (16 × 16 = 256)
constexpr int kPer = kTile / kThreads;     // outputs per thread per side (4)
constexpr int kStagesPerFlush = plan::kGFlush / kK;
static_assert(plan::kGFlush % kK == 0, "flush interval must be a multiple of the stage width");
static_assert(kPer == 4, "each thread reads its 4 rows / 4 columns as one float4");
static_assert(kK % 8 == 0 && kTile % 4 == 0, "load_tile's conflict-free store pattern");
// Shared tiles are s[kk][row] with a row pitch of kTile + 4 floats: a multiple of 4 (16-byte
// aligned float4 reads of a thread's 4 consecutive rows). load_tile's stores are conflict-free:
// a warp writes 4 consecutive rows x 8 consecutive columns, banks (4 kk + row) mod 32 all
// distinct.
constexpr int kPitch = kTile + 4;

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__global__ void column_mean_kernel(const T* __restrict__ x, int64_t n, int64_t d, int64_t ld,
                                   float* __restrict__ mean) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < d;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<double>(to_f32(x[i * ld + k]));
    mean[k] = static_cast<float>(s / static_cast<double>(n));
  }
}

// Load x[i0.., k0..] (kTile rows × kK cols), centred, into s[kk][row]; zero outside the matrix.
// Element e -> row (e / 8) % kTile, column e % 8 + 8 (e / (8 kTile)): a bijection of
// [0, kTile kK); a warp reads 8 consecutive columns of 4 rows (32-byte segments for fp32).
template <typename T>
__device__ __forceinline__ void load_tile(const T* __restrict__ x, const float* __restrict__ mean,
                                          int64_t n, int64_t k_end, int64_t ld, int64_t i0,
                                          int64_t k0, float (*s)[kPitch]) {
  const int t = threadIdx.y * kThreads + threadIdx.x;
  for (int e = t; e < kTile * kK; e += kThreads * kThreads) {
    const int row = (e / 8) % kTile;
    const int kk = e % 8 + 8 * (e / (8 * kTile));
    const int64_t i = i0 + row;
    const int64_t k = k0 + kk;
    float v = 0.f;
    if (i < n && k < k_end) v = to_f32(__ldg(x + i * ld + k)) - __ldg(mean + k);
    s[kk][row] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads* kThreads)
    gram_tile_kernel(const T* __restrict__ x, const float* __restrict__ mean, GramPlan g,
                     int64_t ld, double* __restrict__ partial) {
  // Thread (tx, ty) owns rows 4 ty .. 4 ty + 3 and columns 4 tx .. 4 tx + 3 of the tile: one
  // float4 shared load each per k step (2 loads per 16 FMAs).
  __shared__ __align__(16) float sa[kK][kPitch];
  __shared__ __align__(16) float sb[kK][kPitch];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t items = g.pairs * g.slices;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t pair = item / g.slices, sl = item - pair * g.slices;
    int64_t bi, bj;
    plan::gram_pair(g, pair, &bi, &bj);
    const bool diag = bi == bj;
    const int64_t i0 = bi * kTile, j0 = bj * kTile;
    const int64_t k_begin = sl * g.slice;
    const int64_t k_end = k_begin + g.slice < g.d ? k_begin + g.slice : g.d;
    float acc[kPer][kPer];
    double dacc[kPer][kPer];
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int b = 0; b < kPer; ++b) {
        acc[a][b] = 0.f;
        dacc[a][b] = 0.0;
      }
    int stage = 0;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kK) {
      load_tile(x, mean, g.n, k_end, ld, i0, k0, sa);
      if (!diag) load_tile(x, mean, g.n, k_end, ld, j0, k0, sb);
      __syncthreads();
      const float(*sbp)[kPitch] = diag ? sa : sb;
#pragma unroll 8
      for (int kk = 0; kk < kK; ++kk) {
        const float4 a4 = *reinterpret_cast<const float4*>(&sa[kk][ty * kPer]);
        const float4 b4 = *reinterpret_cast<const float4*>(&sbp[kk][tx * kPer]);
        const float va[kPer] = {a4.x, a4.y, a4.z, a4.w};
        const float vb[kPer] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int a = 0; a < kPer; ++a)
#pragma unroll
          for (int b = 0; b < kPer; ++b) acc[a][b] = fmaf(va[a], vb[b], acc[a][b]);
      }
      __syncthreads();
      if (++stage == kStagesPerFlush) {  // fp32 chains of at most kGFlush columns
        stage = 0;
#pragma unroll
        for (int a = 0; a < kPer; ++a)
#pragma unroll
          for (int b = 0; b < kPer; ++b) {
            dacc[a][b] += static_cast<double>(acc[a][b]);
            acc[a][b] = 0.f;
          }
      }
    }
    double* out = partial + (pair * g.slices + sl) * kTile * kTile;
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int b = 0; b < kPer; ++b) {
        out[(ty * kPer + a) * kTile + tx * kPer + b] = dacc[a][b] + static_cast<double>(acc[a][b]);
      }
  }
}

// out[i][j] = Σ_slices partial (slice order, fp64), the same sequence for (i, j) and (j, i).
__global__ void gram_finalize_kernel(const double* __restrict__ partial, GramPlan g,
                                     float* __restrict__ out) {
  const int64_t nn = g.n * g.n;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < nn;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / g.n, j = idx - i * g.n;
    double s = 0.0;
    // Slice sl's partial of (i, j) is at gram_partial_index(g, i, j, 0) + sl * kGSliceStride.
    int64_t k = plan::gram_partial_index(g, i, j, 0);
    for (int64_t sl = 0; sl < g.slices; ++sl, k += plan::kGSliceStride) s += partial[k];
    out[idx] = static_cast<float>(s);
  }
}

template <typename T>
cudaError_t launch(const T* x, int64_t n, int64_t d, int64_t ld, float* mean, double* partial,
                   float* out, cudaStream_t stream) {
  const GramPlan g = plan::make_gram_plan(n, d);
  if (n <= 0 || d <= 0) return cudaSuccess;
  const int threads = 256;
  column_mean_kernel<T><<<capped_blocks((d + threads - 1) / threads, 65535), threads, 0, stream>>>(
      x, n, d, ld, mean);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  gram_tile_kernel<T><<<capped_blocks(g.pairs * g.slices, int64_t(1) << 20),
                        dim3(kThreads, kThreads), 0, stream>>>(x, mean, g, ld, partial);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  gram_finalize_kernel<<<capped_blocks((n * n + threads - 1) / threads, 65535), threads, 0,
                         stream>>>(partial, g, out);
  return cudaGetLastError();
}

}  // namespace

int64_t gram_partial_count(int64_t n, int64_t d) {
  const GramPlan g = plan::make_gram_plan(n, d);
  return g.pairs * g.slices * kTile * kTile;
}

cudaError_t centered_gram(const void* x, GramDType dtype, int64_t n, int64_t d, int64_t ld,
                          float* mean, double* partial, float* out, cudaStream_t stream) {
  switch (dtype) {
    case GramDType::kFloat32:
      return launch(static_cast<const float*>(x), n, d, ld, mean, partial, out, stream);
    case GramDType::kFloat16:
      return launch(static_cast<const __half*>(x), n, d, ld, mean, partial, out, stream);
    case GramDType::kBFloat16:
      return launch(static_cast<const __nv_bfloat16*>(x), n, d, ld, mean, partial, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ompq
