// centered_gram on CUDA: column means, then a tiled shared-memory Gram over the upper-triangle
// tile pairs only (the Gram is symmetric), split over D, then a mirror of the upper triangle.
// Inputs fp32/fp16/bf16 (converted on load, centred on load), fp32 accumulation.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "gram.h"

namespace ompq {
namespace cuda {
namespace {

constexpr int kTile = 64;             // output tile (kTile × kTile)
constexpr int kK = 32;                // k steps per shared-memory stage
constexpr int kThreads = 16;          // threads per tile side (16 × 16 = 256)
constexpr int kPer = kTile / kThreads;  // outputs per thread per side (4)

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

// Tile pair p (upper triangle, row-major over bi <= bj) -> (bi, bj).
__device__ __forceinline__ void pair_of(int p, int tiles, int* bi, int* bj) {
  int i = 0;
  int row_len = tiles;
  while (p >= row_len) {
    p -= row_len;
    ++i;
    --row_len;
  }
  *bi = i;
  *bj = i + p;
}

// Load x[i0.., k0..] (kTile rows × kK cols), centred, into s[kk][row]; zero outside the matrix.
template <typename T>
__device__ __forceinline__ void load_tile(const T* __restrict__ x, const float* __restrict__ mean,
                                          int64_t n, int64_t k_end, int64_t ld, int64_t i0,
                                          int64_t k0, float (*s)[kTile + 1]) {
  const int t = threadIdx.y * kThreads + threadIdx.x;
  for (int e = t; e < kTile * kK; e += kThreads * kThreads) {
    const int row = e / kK;
    const int kk = e % kK;
    const int64_t i = i0 + row;
    const int64_t k = k0 + kk;
    float v = 0.f;
    if (i < n && k < k_end) v = to_f32(x[i * ld + k]) - mean[k];
    s[kk][row] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads* kThreads)
    gram_tile_kernel(const T* __restrict__ x, const float* __restrict__ mean, int64_t n, int64_t d,
                     int64_t ld, int tiles, int64_t slice, float* __restrict__ out) {
  __shared__ float sa[kK][kTile + 1];
  __shared__ float sb[kK][kTile + 1];
  int bi, bj;
  pair_of(blockIdx.x, tiles, &bi, &bj);
  const bool diag = bi == bj;
  const int64_t i0 = static_cast<int64_t>(bi) * kTile;
  const int64_t j0 = static_cast<int64_t>(bj) * kTile;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * slice;
  const int64_t k_end = k_begin + slice < d ? k_begin + slice : d;
  const int tx = threadIdx.x, ty = threadIdx.y;
  float acc[kPer][kPer];
#pragma unroll
  for (int a = 0; a < kPer; ++a)
#pragma unroll
    for (int b = 0; b < kPer; ++b) acc[a][b] = 0.f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kK) {
    load_tile(x, mean, n, k_end, ld, i0, k0, sa);
    if (!diag) load_tile(x, mean, n, k_end, ld, j0, k0, sb);
    __syncthreads();
    const float(*sbp)[kTile + 1] = diag ? sa : sb;
#pragma unroll 8
    for (int kk = 0; kk < kK; ++kk) {
      float va[kPer], vb[kPer];
#pragma unroll
      for (int a = 0; a < kPer; ++a) va[a] = sa[kk][ty + a * kThreads];
#pragma unroll
      for (int b = 0; b < kPer; ++b) vb[b] = sbp[kk][tx + b * kThreads];
#pragma unroll
      for (int a = 0; a < kPer; ++a)
#pragma unroll
        for (int b = 0; b < kPer; ++b) acc[a][b] = fmaf(va[a], vb[b], acc[a][b]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int a = 0; a < kPer; ++a) {
    const int64_t i = i0 + ty + a * kThreads;
#pragma unroll
    for (int b = 0; b < kPer; ++b) {
      const int64_t j = j0 + tx + b * kThreads;
      if (i < n && j < n && i <= j) atomicAdd(out + i * n + j, acc[a][b]);
    }
  }
}

__global__ void mirror_kernel(float* __restrict__ out, int64_t n) {
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n * n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / n, j = idx % n;
    if (i > j) out[idx] = out[j * n + i];
  }
}

template <typename T>
cudaError_t launch(const T* x, int64_t n, int64_t d, int64_t ld, float* mean, float* out,
                   int sm_count, cudaStream_t stream) {
  if (n <= 0 || d <= 0) return cudaSuccess;
  const int threads = 256;
  const int64_t mean_blocks_needed = (d + threads - 1) / threads;
  const int mean_blocks = static_cast<int>(mean_blocks_needed < 65535 ? mean_blocks_needed : 65535);
  column_mean_kernel<T><<<mean_blocks, threads, 0, stream>>>(x, n, d, ld, mean);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int tiles = static_cast<int>((n + kTile - 1) / kTile);
  const int pairs = tiles * (tiles + 1) / 2;
  const int64_t ksteps = (d + kK - 1) / kK;
  int64_t slices = (4LL * (sm_count > 0 ? sm_count : 80) + pairs - 1) / pairs;
  if (slices > ksteps) slices = ksteps;
  if (slices > 65535) slices = 65535;
  if (slices < 1) slices = 1;
  const int64_t slice = ((ksteps + slices - 1) / slices) * kK;
  slices = (d + slice - 1) / slice;
  dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(slices));
  dim3 block(kThreads, kThreads);
  gram_tile_kernel<T><<<grid, block, 0, stream>>>(x, mean, n, d, ld, tiles, slice, out);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int64_t mirror_needed = (n * n + threads - 1) / threads;
  const int mirror_blocks = static_cast<int>(mirror_needed < 65535 ? mirror_needed : 65535);
  mirror_kernel<<<mirror_blocks, threads, 0, stream>>>(out, n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t centered_gram(const void* x, GramDType dtype, int64_t n, int64_t d, int64_t ld,
                          float* mean, float* out, int sm_count, cudaStream_t stream) {
  switch (dtype) {
    case GramDType::kFloat32:
      return launch(static_cast<const float*>(x), n, d, ld, mean, out, sm_count, stream);
    case GramDType::kFloat16:
      return launch(static_cast<const __half*>(x), n, d, ld, mean, out, sm_count, stream);
    case GramDType::kBFloat16:
      return launch(static_cast<const __nv_bfloat16*>(x), n, d, ld, mean, out, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace ompq
