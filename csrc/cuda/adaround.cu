// AdaRound ops on CUDA: fused element-wise forward/backward and a deterministic regulariser sum.
// Per-element math: kernel_math.h (no FMA contraction, same operation order as the CPU; expf and
// powf differ from the CPU's vectorised exp/pow in the last bits). Work partition: the row
// traversal of kernel_plan.h (no per-element integer division, 64-bit indices).
#include <cuda_runtime.h>

#include <cstdint>

#include "adaround.h"
#include "row_traverse.cuh"

namespace ompq {
namespace cuda {
namespace {

using rows::Pack;

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;
constexpr int kRegBlocks = 1024;

int blocks_for(int64_t numel) {
  return plan::capped_blocks((numel + kThreads - 1) / kThreads, kMaxBlocks);
}

template <typename T>
struct AdaCoef {
  T s, z;
};

// y = (clamp(floor(w/s) + h(v) + z, qmin, qmax) - z) * s per element (kernel_math.h).
// Inputs are read through __ldg (rows::ldg / rows::load_pack); see rows::for_each_element.
template <typename T>
struct FwdVisitor {
  using Coef = AdaCoef<T>;
  struct In {
    T w, v;
  };
  struct InVec {
    Pack<T> w, v;
  };
  const T* w;
  const T* v;
  const T* scale;
  const T* zp;
  T* out;
  T lo, hi;
  bool soft;
  __device__ __forceinline__ Coef coef(int64_t c) const {
    return Coef{rows::ldg(scale + c), rows::ldg(zp + c)};
  }
  __device__ __forceinline__ In load(int64_t i) const { return In{rows::ldg(w + i), rows::ldg(v + i)}; }
  __device__ __forceinline__ void put(const Coef& k, const In& a, int64_t i) const {
    out[i] = kmath::ada_forward<T>(a.w, a.v, k.s, k.z, lo, hi, soft);
  }
  __device__ __forceinline__ InVec load_vec(int64_t i) const {
    return InVec{rows::load_pack(w, i), rows::load_pack(v, i)};
  }
  __device__ __forceinline__ void put_vec(const Coef& k, const InVec& a, int64_t i) const {
    Pack<T> o;
#pragma unroll
    for (int u = 0; u < Pack<T>::N; ++u) {
      o.v[u] = kmath::ada_forward<T>(a.w.v[u], a.v.v[u], k.s, k.z, lo, hi, soft);
    }
    rows::store_pack(out, i, o);
  }
};

// gw = grad * [inside], gv = gw * s * h'(v) (soft) or 0 (hard).
template <typename T>
struct BwdVisitor {
  using Coef = AdaCoef<T>;
  struct In {
    T g, w, v;
  };
  struct InVec {
    Pack<T> g, w, v;
  };
  const T* grad;
  const T* w;
  const T* v;
  const T* scale;
  const T* zp;
  T* gw;
  T* gv;
  T lo, hi;
  bool soft;
  __device__ __forceinline__ Coef coef(int64_t c) const {
    return Coef{rows::ldg(scale + c), rows::ldg(zp + c)};
  }
  __device__ __forceinline__ In load(int64_t i) const {
    return In{rows::ldg(grad + i), rows::ldg(w + i), rows::ldg(v + i)};
  }
  __device__ __forceinline__ void put(const Coef& k, const In& a, int64_t i) const {
    kmath::ada_backward<T>(a.g, a.w, a.v, k.s, k.z, lo, hi, soft, gw + i, gv + i);
  }
  __device__ __forceinline__ InVec load_vec(int64_t i) const {
    return InVec{rows::load_pack(grad, i), rows::load_pack(w, i), rows::load_pack(v, i)};
  }
  __device__ __forceinline__ void put_vec(const Coef& k, const InVec& a, int64_t i) const {
    Pack<T> ow, ov;
#pragma unroll
    for (int u = 0; u < Pack<T>::N; ++u) {
      kmath::ada_backward<T>(a.g.v[u], a.w.v[u], a.v.v[u], k.s, k.z, lo, hi, soft, &ow.v[u],
                             &ov.v[u]);
    }
    rows::store_pack(gw, i, ow);
    rows::store_pack(gv, i, ov);
  }
};

template <typename T>
__global__ void __launch_bounds__(plan::kBlock) forward_kernel(FwdVisitor<T> vis,
                                                               plan::RowPlan p, int shift) {
  rows::for_each_element<T>(p, shift, vis);
}

template <typename T>
__global__ void __launch_bounds__(plan::kBlock) backward_kernel(BwdVisitor<T> vis,
                                                                plan::RowPlan p, int shift) {
  rows::for_each_element<T>(p, shift, vis);
}

plan::RowPlan plan_of(const QuantLayout& lay) {
  const int64_t per = lay.channels * lay.inner;
  return plan::make_row_plan(per > 0 ? lay.numel / per : 0, lay.channels, lay.inner);
}

template <typename T>
__global__ void reg_partial_kernel(const T* __restrict__ v, int64_t numel, T beta,
                                   double* __restrict__ partials) {
  __shared__ double red[kThreads];
  double s = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    s += static_cast<double>(kmath::ada_reg<T>(rows::ldg(v + i), beta));
  }
  red[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = red[0];
}

template <typename T>
__global__ void reg_final_kernel(const double* __restrict__ partials, int count, T* out) {
  __shared__ double red[kThreads];
  double s = 0.0;
  for (int i = threadIdx.x; i < count; i += kThreads) s += partials[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<T>(red[0]);
}

template <typename T>
__global__ void reg_backward_kernel(const T* __restrict__ grad, const T* __restrict__ v,
                                    int64_t numel, T beta, T beta_m1, T* __restrict__ gv) {
  const T gs = kmath::mul(T(-2), grad[0]);  // exact: the CPU's (T)(-2.0 * g)
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    gv[i] = kmath::ada_reg_backward<T>(gs, rows::ldg(v + i), beta, beta_m1);
  }
}

template <typename T>
cudaError_t forward_impl(const T* w, const T* v, const T* scale, const T* zp, T* out,
                         QuantLayout lay, bool soft, cudaStream_t stream) {
  const plan::RowPlan p = plan_of(lay);
  if (p.numel == 0) return cudaSuccess;
  FwdVisitor<T> vis{w, v, scale, zp, out, static_cast<T>(lay.qmin), static_cast<T>(lay.qmax),
                    soft};
  forward_kernel<T><<<rows::row_blocks(p), plan::kBlock, 0, stream>>>(
      vis, p, rows::pack_shift<T>({w, v, out}));
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const T* grad, const T* w, const T* v, const T* scale, const T* zp,
                          T* gw, T* gv, QuantLayout lay, bool soft, cudaStream_t stream) {
  const plan::RowPlan p = plan_of(lay);
  if (p.numel == 0) return cudaSuccess;
  BwdVisitor<T> vis{grad, w, v, scale, zp, gw, gv, static_cast<T>(lay.qmin),
                    static_cast<T>(lay.qmax), soft};
  backward_kernel<T><<<rows::row_blocks(p), plan::kBlock, 0, stream>>>(
      vis, p, rows::pack_shift<T>({grad, w, v, gw, gv}));
  return cudaGetLastError();
}

template <typename T>
cudaError_t reg_impl(const T* v, int64_t numel, double beta, double* partials, T* out,
                     cudaStream_t stream) {
  const int blocks = adaround_reg_partials(numel);
  reg_partial_kernel<T><<<blocks, kThreads, 0, stream>>>(v, numel, static_cast<T>(beta), partials);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reg_final_kernel<T><<<1, kThreads, 0, stream>>>(partials, blocks, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t reg_backward_impl(const T* grad, const T* v, int64_t numel, double beta, T* gv,
                              cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  reg_backward_kernel<T><<<blocks_for(numel), kThreads, 0, stream>>>(
      grad, v, numel, static_cast<T>(beta), static_cast<T>(beta - 1.0), gv);
  return cudaGetLastError();
}

}  // namespace

int adaround_reg_partials(int64_t numel) {
  return plan::capped_blocks((numel + kThreads - 1) / kThreads, kRegBlocks);
}

cudaError_t adaround_forward(const float* w, const float* v, const float* scale, const float* zp,
                             float* out, QuantLayout lay, bool soft, cudaStream_t stream) {
  return forward_impl(w, v, scale, zp, out, lay, soft, stream);
}
cudaError_t adaround_forward(const double* w, const double* v, const double* scale,
                             const double* zp, double* out, QuantLayout lay, bool soft,
                             cudaStream_t stream) {
  return forward_impl(w, v, scale, zp, out, lay, soft, stream);
}
cudaError_t adaround_backward(const float* grad, const float* w, const float* v,
                              const float* scale, const float* zp, float* gw, float* gv,
                              QuantLayout lay, bool soft, cudaStream_t stream) {
  return backward_impl(grad, w, v, scale, zp, gw, gv, lay, soft, stream);
}
cudaError_t adaround_backward(const double* grad, const double* w, const double* v,
                              const double* scale, const double* zp, double* gw, double* gv,
                              QuantLayout lay, bool soft, cudaStream_t stream) {
  return backward_impl(grad, w, v, scale, zp, gw, gv, lay, soft, stream);
}
cudaError_t adaround_reg(const float* v, int64_t numel, double beta, double* partials, float* out,
                         cudaStream_t stream) {
  return reg_impl(v, numel, beta, partials, out, stream);
}
cudaError_t adaround_reg(const double* v, int64_t numel, double beta, double* partials,
                         double* out, cudaStream_t stream) {
  return reg_impl(v, numel, beta, partials, out, stream);
}
cudaError_t adaround_reg_backward(const float* grad, const float* v, int64_t numel, double beta,
                                  float* gv, cudaStream_t stream) {
  return reg_backward_impl(grad, v, numel, beta, gv, stream);
}
cudaError_t adaround_reg_backward(const double* grad, const double* v, int64_t numel, double beta,
                                  double* gv, cudaStream_t stream) {
  return reg_backward_impl(grad, v, numel, beta, gv, stream);
}

}  // namespace cuda
}  // namespace ompq
