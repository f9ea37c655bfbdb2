// Device helpers shared by the element-wise CUDA kernels (fake_quant.cu, adaround.cu): native
// dtype loads/stores, 16-byte vector packs, the row traversal of kernel_plan.h and a fixed-order
// warp reduction. CUDA runtime headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>

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

// Read-only loads through the non-coherent path (ld.global.nc): __restrict__ on struct members
// is ignored by nvcc, so the kernels ask for it explicitly.
template <typename S>
__device__ __forceinline__ S ldg(const S* p) {
  return __ldg(p);
}
// Pack of elements [i, i + N): p + i must be 16-byte aligned.
template <typename S>
__device__ __forceinline__ Pack<S> load_pack(const S* p, int64_t i) {
  const uint4 r = __ldg(reinterpret_cast<const uint4*>(p + i));
  Pack<S> o;
  memcpy(&o, &r, sizeof(o));
  return o;
}
template <typename S>
__device__ __forceinline__ void store_pack(S* p, int64_t i, const Pack<S>& v) {
  *reinterpret_cast<Pack<S>*>(p + i) = v;
}

// Element shift of a set of same-dtype arrays: element i of all of them is 16-byte aligned iff
// (i + shift) % N == 0. -1 when their addresses differ modulo 16 bytes (no common packs).
template <typename S>
int pack_shift(std::initializer_list<const void*> ptrs) {
  const uintptr_t m0 = reinterpret_cast<uintptr_t>(*ptrs.begin()) % 16;
  for (const void* q : ptrs) {
    const uintptr_t m = reinterpret_cast<uintptr_t>(q) % 16;
    if (m != m0 || m % sizeof(S) != 0) return -1;
  }
  return static_cast<int>((m0 / sizeof(S)) % Pack<S>::N);
}

// Elements i = i0, i0 + step, ... < end, kUnroll at a time: all loads first (kUnroll
// independent loads in flight per thread), then compute and store. Vec: i is a pack index
// start (16-byte aligned) and V::load_vec / V::put_vec handle N elements.
constexpr int kUnroll = 4;
template <bool Vec, typename V, typename K>
__device__ __forceinline__ void strided(const V& v, const K& k, int64_t i0, int64_t end,
                                        int64_t step) {
  using In = typename std::conditional<Vec, typename V::InVec, typename V::In>::type;
  for (int64_t i = i0; i < end; i += kUnroll * step) {
    In a[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * step;
      if (j < end) {
        if constexpr (Vec) {
          a[u] = v.load_vec(j);
        } else {
          a[u] = v.load(j);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * step;
      if (j < end) {
        if constexpr (Vec) {
          v.put_vec(k, a[u], j);
        } else {
          v.put(k, a[u], j);
        }
      }
    }
  }
}

// Visits every element once. V::Coef V::coef(c) builds the per-channel coefficients;
// V::load(i) -> V::In reads element i's inputs and V::put(k, in, i) computes and stores it;
// V::load_vec(i) / V::put_vec(k, in, i) do the same for the pack [i, i + N) (i 16-byte aligned).
// Long rows: each warp item (one row segment) is split into a scalar head up to the first
// aligned element, a vector body of whole packs and a scalar tail (shift >= 0, see pack_shift);
// shift < 0: all scalar. Short rows: each thread walks its column kUnroll iterations at a time.
// No reductions here, so the load width never changes a result.
// Long rows: calls f(item, lane, c, b, e) for every warp item this warp owns (grid-stride over
// the items; c is the item's channel, [b, e) its elements). Warp-uniform: every lane of a warp
// sees the same items, so f may use warp shuffles.
template <typename F>
__device__ __forceinline__ void for_each_warp_item(const plan::RowPlan& p, F&& f) {
  const int lane = threadIdx.x % plan::kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / plan::kWarp);
  for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / plan::kWarp;
       item < p.items; item += warps) {
    int64_t c, b, e;
    plan::long_item(p, item, &c, &b, &e);
    f(item, lane, c, b, e);
  }
}

template <typename S, typename V>
__device__ __forceinline__ void for_each_element(const plan::RowPlan& p, int shift, const V& v) {
  constexpr int64_t N = Pack<S>::N;
  if (p.long_rows) {
    for_each_warp_item(p, [&](int64_t, int lane, int64_t c, int64_t b, int64_t e) {
      const auto k = v.coef(c);
      if (shift < 0) {
        strided<false>(v, k, b + lane, e, plan::kWarp);
        return;
      }
      int64_t hb, ve;  // head [b, hb), packs [hb, ve), tail [ve, e)
      plan::pack_split(b, e, shift, N, &hb, &ve);
      if (b + lane < hb) v.put(k, v.load(b + lane), b + lane);  // head: < N elements
      strided<true>(v, k, hb + lane * N, ve, plan::kWarp * N);
      if (ve + lane < e) v.put(k, v.load(ve + lane), ve + lane);  // tail: < N elements
    });
  } else {
    for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
      plan::ShortThread st;
      if (!plan::short_thread(p, tile, threadIdx.x, &st)) continue;
      const auto k = v.coef(st.c);
      strided<false>(v, k, st.base, st.base + plan::short_iters(p, st) * st.step, st.step);
    }
  }
}

// Blocks for a row kernel: enough warps/tiles, capped (the kernels grid-stride; the partition
// and hence every result does not depend on the grid size).
inline int row_blocks(const plan::RowPlan& p) {
  const int64_t want = p.long_rows ? (p.items + plan::kBlock / plan::kWarp - 1) /
                                         (plan::kBlock / plan::kWarp)
                                   : p.tiles;
  return plan::capped_blocks(want, 16384);
}

// Sum of v over the 32 lanes in a fixed tree; the result is valid in lane 0.
__device__ __forceinline__ double warp_sum(double v) {
  for (int off = plan::kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace rows
}  // namespace cuda
}  // namespace ompq
