// CUDA kernels for the packed-weight ops. CUDA runtime headers only.
//
// Every kernel reads a weight row's groups with one aligned load per group for 2, 4 and 8 bits
// (byte loads for 3, 5, 6 and 7 bits), extracts the 8 codes with shifts and masks, and works with
// u - offset (exact in fp32 for integer offsets), so no cancellation against offset·Σx occurs.
//   * GEMV (batch <= kPackedGemvMaxBatch): one warp per output row; lane l takes groups
//     l, l + 32, ... (a warp reads 32 consecutive groups: coalesced), accumulates
//     Σ x[n, k]·(u - offset) in fp32 for the NB batch rows, a fixed shuffle tree adds the lanes,
//     and lane 0 writes y = scale·Σ + bias. The packed weights are read once.
//   * Tiled (larger batches): a 16×16-thread block computes a 64 (batch) × 64 (output rows) tile
//     of y, 4×4 per thread, walking K in steps of 32 codes: the x tile and the unpacked weight
//     tile (u - offset, one group per thread) are staged in shared memory. Each weight is read
//     once per 64 rows of x.
// Deterministic: every sum is computed in an order fixed by the shape. No atomics.
#include <cuda_runtime.h>

#include <cstdint>

#include "packed_linear.h"

namespace ompq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

int blocks_for(int64_t items, int threads) {
  const int64_t b = (items + threads - 1) / threads;
  return static_cast<int>(b < 1 ? 1 : (b > 65535 * 32 ? 65535 * 32 : b));
}

// The 8 codes of group g of a row, as the low 8·B bits of a little-endian integer.
template <int B>
__device__ __forceinline__ uint64_t load_group(const uint8_t* __restrict__ row, int64_t g) {
  const uint8_t* p = row + g * B;
  if constexpr (B == 8) {
    return static_cast<uint64_t>(__ldg(reinterpret_cast<const unsigned long long*>(p)));
  } else if constexpr (B == 4) {
    return static_cast<uint64_t>(__ldg(reinterpret_cast<const unsigned int*>(p)));
  } else if constexpr (B == 2) {
    return static_cast<uint64_t>(__ldg(reinterpret_cast<const unsigned short*>(p)));
  } else {
    uint64_t w = 0;
#pragma unroll
    for (int i = 0; i < B; ++i) w |= static_cast<uint64_t>(__ldg(p + i)) << (8 * i);
    return w;
  }
}

template <int B>
__device__ __forceinline__ float code_minus(uint64_t w, int j, float offset) {
  constexpr uint64_t kMask = (uint64_t(1) << B) - 1;
  return __fsub_rn(static_cast<float>(static_cast<uint32_t>((w >> (j * B)) & kMask)), offset);
}

// ----------------------------------------------------------------------------------- pack
__global__ void pack_kernel(const int32_t* __restrict__ codes, PackedDims d, int64_t groups,
                            uint8_t* __restrict__ out) {
  const int64_t total = d.rows * groups;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups, g = i % groups;
    const int32_t* c = codes + r * d.k + g * 8;
    const int64_t n = d.k - g * 8 < 8 ? d.k - g * 8 : 8;
    uint64_t w = 0;
    for (int64_t j = 0; j < n; ++j) {
      w |= static_cast<uint64_t>(static_cast<uint32_t>(c[j])) << (j * d.bits);
    }
    uint8_t* o = out + r * d.row_bytes + g * d.bits;
    for (int b = 0; b < d.bits; ++b) o[b] = static_cast<uint8_t>(w >> (8 * b));
  }
}

// --------------------------------------------------------------------------------- unpack
template <int B>
__global__ void unpack_kernel(const uint8_t* __restrict__ packed, PackedDims d, int64_t groups,
                              const float* __restrict__ scale, const float* __restrict__ offset,
                              float* __restrict__ out) {
  const int64_t total = d.rows * groups;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / groups, g = i % groups;
    const uint64_t w = load_group<B>(packed + r * d.row_bytes, g);
    const float s = __ldg(scale + r), o = __ldg(offset + r);
    float* dst = out + r * d.k + g * 8;
    const int64_t n = d.k - g * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (j < n) dst[j] = __fmul_rn(code_minus<B>(w, j, o), s);
    }
  }
}

// ----------------------------------------------------------------------------------- GEMV
template <int B, int NB>
__global__ void __launch_bounds__(kThreads)
    gemv_kernel(const float* __restrict__ x, const uint8_t* __restrict__ packed, PackedDims d,
                const float* __restrict__ scale, const float* __restrict__ offset,
                const float* __restrict__ bias, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (r >= d.rows) return;  // r is the same for the whole warp
  const uint8_t* row = packed + r * d.row_bytes;
  const float o = __ldg(offset + r);
  const int64_t groups = (d.k + 7) / 8, full = d.k / 8;
  float acc[NB];
#pragma unroll
  for (int n = 0; n < NB; ++n) acc[n] = 0.f;
  for (int64_t g = lane; g < groups; g += 32) {
    const uint64_t w = load_group<B>(row, g);
    const int64_t k0 = g * 8;
    if (g < full) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float u = code_minus<B>(w, j, o);
#pragma unroll
        for (int n = 0; n < NB; ++n) acc[n] = fmaf(__ldg(x + n * d.k + k0 + j), u, acc[n]);
      }
    } else {
      for (int j = 0; j < 8 && k0 + j < d.k; ++j) {
        const float u = code_minus<B>(w, j, o);
#pragma unroll
        for (int n = 0; n < NB; ++n) acc[n] = fmaf(__ldg(x + n * d.k + k0 + j), u, acc[n]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < NB; ++n) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[n] += __shfl_down_sync(0xffffffffu, acc[n], off);
  }
  if (lane == 0) {
    const float s = __ldg(scale + r);
    const float b = bias ? __ldg(bias + r) : 0.f;
#pragma unroll
    for (int n = 0; n < NB; ++n) y[n * d.rows + r] = __fadd_rn(__fmul_rn(s, acc[n]), b);
  }
}

// ---------------------------------------------------------------------------------- tiled
constexpr int kTM = 64;  // batch rows per tile
constexpr int kTN = 64;  // output rows per tile
constexpr int kTK = 32;  // codes per step (4 groups)
constexpr int kSide = 16;  // threads per tile side
static_assert(kTN * (kTK / 8) == kSide * kSide, "one weight group per thread and step");

template <int B>
__global__ void __launch_bounds__(kSide* kSide)
    gemm_kernel(const float* __restrict__ x, int64_t n, const uint8_t* __restrict__ packed,
                PackedDims d, const float* __restrict__ scale, const float* __restrict__ offset,
                const float* __restrict__ bias, float* __restrict__ y) {
  __shared__ float xs[kTK][kTM + 4];  // xs[kk][m]
  __shared__ float ws[kTK][kTN + 4];  // ws[kk][r] = u - offset
  const int tx = threadIdx.x, ty = threadIdx.y, t = ty * kSide + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTN;
  const int64_t groups = (d.k + 7) / 8;
  const int64_t mtiles = (n + kTM - 1) / kTM;
  // This thread's weight group in every step: row r0 + t / 4, group (k0 / 8) + t % 4.
  const int wr = t / (kTK / 8), wg = t % (kTK / 8);
  const int64_t grow = r0 + wr;
  const bool row_ok = grow < d.rows;
  const float wo = row_ok ? __ldg(offset + grow) : 0.f;
  const uint8_t* wrow = packed + (row_ok ? grow : 0) * d.row_bytes;
  for (int64_t mt = blockIdx.y; mt < mtiles; mt += gridDim.y) {
    const int64_t m0 = mt * kTM;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int64_t k0 = 0; k0 < d.k; k0 += kTK) {
      for (int e = t; e < kTM * kTK; e += kSide * kSide) {
        const int m = e / kTK, kk = e % kTK;
        const int64_t gm = m0 + m, gk = k0 + kk;
        xs[kk][m] = (gm < n && gk < d.k) ? __ldg(x + gm * d.k + gk) : 0.f;
      }
      {
        const int64_t g = k0 / 8 + wg;
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = 0.f;
        if (row_ok && g < groups) {
          const uint64_t w = load_group<B>(wrow, g);
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (g * 8 + j < d.k) v[j] = code_minus<B>(w, j, wo);
          }
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) ws[wg * 8 + j][wr] = v[j];
      }
      __syncthreads();
      // Two-level sum (32 codes per step, then the steps): fp32 error grows with sqrt(K / 32)
      // rather than with K.
      float part[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) part[i][j] = 0.f;
#pragma unroll 8
      for (int kk = 0; kk < kTK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = xs[kk][ty + kSide * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = ws[kk][tx + kSide * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) part[i][j] = fmaf(a[i], b[j], part[i][j]);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += part[i][j];
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = r0 + tx + kSide * j;
      if (r >= d.rows) continue;
      const float s = __ldg(scale + r);
      const float b = bias ? __ldg(bias + r) : 0.f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + ty + kSide * i;
        if (m < n) y[m * d.rows + r] = __fadd_rn(__fmul_rn(s, acc[i][j]), b);
      }
    }
  }
}

template <int B>
cudaError_t launch_unpack(const uint8_t* packed, PackedDims d, const float* scale,
                          const float* offset, float* out, cudaStream_t stream) {
  const int64_t groups = (d.k + 7) / 8;
  unpack_kernel<B><<<blocks_for(d.rows * groups, kThreads), kThreads, 0, stream>>>(
      packed, d, groups, scale, offset, out);
  return cudaGetLastError();
}

template <int B>
cudaError_t launch_linear(const float* x, int64_t n, const uint8_t* packed, PackedDims d,
                          const float* scale, const float* offset, const float* bias, float* y,
                          cudaStream_t stream) {
  if (n <= kPackedGemvMaxBatch) {
    const int blocks = static_cast<int>((d.rows + kWarps - 1) / kWarps);
    switch (n) {
      case 1:
        gemv_kernel<B, 1><<<blocks, kThreads, 0, stream>>>(x, packed, d, scale, offset, bias, y);
        break;
      case 2:
        gemv_kernel<B, 2><<<blocks, kThreads, 0, stream>>>(x, packed, d, scale, offset, bias, y);
        break;
      case 3:
        gemv_kernel<B, 3><<<blocks, kThreads, 0, stream>>>(x, packed, d, scale, offset, bias, y);
        break;
      default:
        gemv_kernel<B, 4><<<blocks, kThreads, 0, stream>>>(x, packed, d, scale, offset, bias, y);
        break;
    }
    return cudaGetLastError();
  }
  const int64_t mtiles = (n + kTM - 1) / kTM;
  const dim3 grid(static_cast<unsigned>((d.rows + kTN - 1) / kTN),
                  static_cast<unsigned>(mtiles < 65535 ? mtiles : 65535));
  gemm_kernel<B><<<grid, dim3(kSide, kSide), 0, stream>>>(x, n, packed, d, scale, offset, bias,
                                                          y);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pack_rows(const int32_t* codes, PackedDims d, uint8_t* out, cudaStream_t stream) {
  const int64_t groups = (d.k + 7) / 8;
  if (d.rows * groups == 0) return cudaSuccess;
  pack_kernel<<<blocks_for(d.rows * groups, kThreads), kThreads, 0, stream>>>(codes, d, groups,
                                                                              out);
  return cudaGetLastError();
}

cudaError_t unpack_rows(const uint8_t* packed, PackedDims d, const float* scale,
                        const float* offset, float* out, cudaStream_t stream) {
  if (d.rows == 0 || d.k == 0) return cudaSuccess;
  switch (d.bits) {
    case 2: return launch_unpack<2>(packed, d, scale, offset, out, stream);
    case 3: return launch_unpack<3>(packed, d, scale, offset, out, stream);
    case 4: return launch_unpack<4>(packed, d, scale, offset, out, stream);
    case 5: return launch_unpack<5>(packed, d, scale, offset, out, stream);
    case 6: return launch_unpack<6>(packed, d, scale, offset, out, stream);
    case 7: return launch_unpack<7>(packed, d, scale, offset, out, stream);
    case 8: return launch_unpack<8>(packed, d, scale, offset, out, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t packed_linear(const float* x, int64_t n, const uint8_t* packed, PackedDims d,
                          const float* scale, const float* offset, const float* bias, float* y,
                          cudaStream_t stream) {
  if (n == 0 || d.rows == 0) return cudaSuccess;
  switch (d.bits) {
    case 2: return launch_linear<2>(x, n, packed, d, scale, offset, bias, y, stream);
    case 3: return launch_linear<3>(x, n, packed, d, scale, offset, bias, y, stream);
    case 4: return launch_linear<4>(x, n, packed, d, scale, offset, bias, y, stream);
    case 5: return launch_linear<5>(x, n, packed, d, scale, offset, bias, y, stream);
    case 6: return launch_linear<6>(x, n, packed, d, scale, offset, bias, y, stream);
    case 7: return launch_linear<7>(x, n, packed, d, scale, offset, bias, y, stream);
    case 8: return launch_linear<8>(x, n, packed, d, scale, offset, bias, y, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace ompq
