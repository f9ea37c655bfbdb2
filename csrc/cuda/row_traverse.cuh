// Device helpers shared by the element-wise CUDA kernels (fake_quant.cu, adaround.cu): native
// dtype loads/stores, 16-byte vector packs, the row traversal of kernel_plan.h and a fixed-order
// warp reduction. CUDA runtime headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "kernel_math.h"
#include "kernel_plan.h"

namespace ompq {
namespace cuda {
namespace rows {

// Storage type S and compute type T of each dtype; half/bf16 compute in float (like the CPU).
struct F32 {
  using S = float;
  using T = float;
  static __device__ __forceinline__ T to(S v) { return v; }
  static __device__ __forceinline__ S from(T v) { return v; }
};
struct F64 {
  using S = double;
  using T = double;
  static __device__ __forceinline__ T to(S v) { return v; }
  static __device__ __forceinline__ S from(T v) { return v; }
};
struct F16 {
  using S = unsigned short;
  using T = float;
  static __device__ __forceinline__ T to(S v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ S from(T v) { return __half_as_ushort(__float2half_rn(v)); }
};
struct BF16 {
  using S = unsigned short;
  using T = float;
  static __device__ __forceinline__ T to(S v) {
    return __bfloat162float(__ushort_as_bfloat16(v));
  }
  static __device__ __forceinline__ S from(T v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

template <typename S>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(S);
  S v[N];
};

template <typename S>
__device__ __forceinline__ Pack<S> load_pack(const S* p, int64_t j) {
  return reinterpret_cast<const Pack<S>*>(p)[j];
}
template <typename S>
__device__ __forceinline__ void store_pack(S* p, int64_t j, const Pack<S>& v) {
  reinterpret_cast<Pack<S>*>(p)[j] = v;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Visits every element once. V::Coef V::coef(c) builds the per-channel coefficients;
// V::elem(k, i) handles element i; V::elem_vec(k, j) handles elements [j*N, j*N + N) (only when
// `vec`: long rows, inner % N == 0 and 16-byte aligned pointers, checked by the launcher).
template <typename S, typename V>
__device__ __forceinline__ void for_each_element(const plan::RowPlan& p, bool vec, const V& v) {
  if (p.long_rows) {
    const int lane = threadIdx.x % plan::kWarp;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / plan::kWarp);
    for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) /
                        plan::kWarp;
         item < p.items; item += warps) {
      int64_t c, b, e;
      plan::long_item(p, item, &c, &b, &e);
      const auto k = v.coef(c);
      if (vec) {
        constexpr int N = Pack<S>::N;
        for (int64_t j = b / N + lane; j < e / N; j += plan::kWarp) v.elem_vec(k, j);
      } else {
        for (int64_t i = b + lane; i < e; i += plan::kWarp) v.elem(k, i);
      }
    }
  } else {
    for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
      plan::ShortThread st;
      if (!plan::short_thread(p, tile, threadIdx.x, &st)) continue;
      const auto k = v.coef(st.c);
      int64_t i = st.base;
      for (int64_t it = 0, o = st.o0; it < plan::kIters && o < p.outer;
           ++it, o += p.rpi, i += st.step) {
        v.elem(k, i);
      }
    }
  }
}

// Blocks for a row kernel: enough warps/tiles, capped (the kernels grid-stride; the partition
// and hence every result does not depend on the grid size).
inline int row_blocks(const plan::RowPlan& p) {
  const int64_t want = p.long_rows ? (p.items + plan::kBlock / plan::kWarp - 1) /
                                         (plan::kBlock / plan::kWarp)
                                   : p.tiles;
  const int64_t cap = 16384;
  return static_cast<int>(want < 1 ? 1 : (want > cap ? cap : want));
}

// Sum of v over the 32 lanes in a fixed tree; the result is valid in lane 0.
__device__ __forceinline__ double warp_sum(double v) {
  for (int off = plan::kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace rows
}  // namespace cuda
}  // namespace ompq
