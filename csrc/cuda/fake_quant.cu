// CUDA kernels for fake_quant / lsq_fake_quant. CUDA runtime headers only.
//
// Per-element math: kernel_math.h (round-to-nearest intrinsics, never contracted into FMAs, and
// rint = round half to even), identical to the CPU kernels' formulas; results equal the CPU bit
// for bit in the forward and in grad_x. Native dtype loads (16-byte packs on long rows), no
// per-element integer division (kernel_plan.h: warps walk row segments of one channel, or
// threads own one column of a channel group), 64-bit indices throughout. The LSQ reductions
// write per-item partial sums with plain stores and a finalise kernel adds them in a fixed order
// in fp64: no atomics, bitwise reproducible.
#include "fake_quant.h"

#include "row_traverse.cuh"

namespace ompq {
namespace cuda {
namespace {

using plan::RowPlan;
using rows::Pack;

template <typename IO>
struct FwdVisitor {
  using S = typename IO::S;
  using T = typename IO::T;
  using Coef = kmath::FqCoef<T>;
  const S* __restrict__ x;
  S* __restrict__ y;
  const float* __restrict__ scale;
  const float* __restrict__ zp;
  float qmin, qmax;
  bool round_zp;
  __device__ __forceinline__ Coef coef(int64_t c) const {
    return kmath::make_fq_coef<T>(scale[c], zp[c], qmin, qmax, round_zp, 1.0f);
  }
  __device__ __forceinline__ void elem(const Coef& k, int64_t i) const {
    y[i] = IO::from(kmath::fq_forward<T>(IO::to(x[i]), k));
  }
  __device__ __forceinline__ void elem_vec(const Coef& k, int64_t j) const {
    const Pack<S> a = rows::load_pack(x, j);
    Pack<S> o;
#pragma unroll
    for (int u = 0; u < Pack<S>::N; ++u) o.v[u] = IO::from(kmath::fq_forward<T>(IO::to(a.v[u]), k));
    rows::store_pack(y, j, o);
  }
};

template <typename IO>
struct BwdVisitor {
  using S = typename IO::S;
  using T = typename IO::T;
  using Coef = kmath::FqCoef<T>;
  const S* __restrict__ g;
  const S* __restrict__ x;
  S* __restrict__ gx;
  const float* __restrict__ scale;
  const float* __restrict__ zp;
  float qmin, qmax;
  __device__ __forceinline__ Coef coef(int64_t c) const {
    return kmath::make_fq_coef<T>(scale[c], zp[c], qmin, qmax, false, 1.0f);
  }
  __device__ __forceinline__ void elem(const Coef& k, int64_t i) const {
    gx[i] = IO::from(kmath::fq_backward<T>(IO::to(g[i]), IO::to(x[i]), k));
  }
  __device__ __forceinline__ void elem_vec(const Coef& k, int64_t j) const {
    const Pack<S> a = rows::load_pack(g, j);
    const Pack<S> b = rows::load_pack(x, j);
    Pack<S> o;
#pragma unroll
    for (int u = 0; u < Pack<S>::N; ++u) {
      o.v[u] = IO::from(kmath::fq_backward<T>(IO::to(a.v[u]), IO::to(b.v[u]), k));
    }
    rows::store_pack(gx, j, o);
  }
};

template <typename IO>
__global__ void __launch_bounds__(plan::kBlock) fq_forward_kernel(FwdVisitor<IO> v, RowPlan p,
                                                                  bool vec) {
  rows::for_each_element<typename IO::S>(p, vec, v);
}

template <typename IO>
__global__ void __launch_bounds__(plan::kBlock) fq_backward_kernel(BwdVisitor<IO> v, RowPlan p,
                                                                   bool vec) {
  rows::for_each_element<typename IO::S>(p, vec, v);
}

// LSQ backward: gx per element, per-item (long rows) or per-(outer tile, channel) (short rows)
// partial sums of the scale / zero-point gradient terms, in fp64, written with plain stores.
template <typename IO>
__global__ void __launch_bounds__(plan::kBlock)
    lsq_backward_kernel(const typename IO::S* __restrict__ g, const typename IO::S* __restrict__ x,
                        typename IO::S* __restrict__ gx, const float* __restrict__ scale,
                        const float* __restrict__ zp, RowPlan p, float qmin, float qmax,
                        float gf, bool vec, double* __restrict__ part_s,
                        double* __restrict__ part_z) {
  using S = typename IO::S;
  using T = typename IO::T;
  auto one = [&](T gv, T xv, const kmath::FqCoef<T>& k, double& ds, double& dz) -> S {
    T a, b;
    const T r = kmath::lsq_backward<T>(gv, xv, k, &a, &b);
    ds += static_cast<double>(a);
    dz += static_cast<double>(b);
    return IO::from(r);
  };
  if (p.long_rows) {
    const int lane = threadIdx.x % plan::kWarp;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / plan::kWarp);
    for (int64_t item = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) /
                        plan::kWarp;
         item < p.items; item += warps) {
      int64_t c, b, e;
      plan::long_item(p, item, &c, &b, &e);
      const auto k = kmath::make_fq_coef<T>(scale[c], zp[c], qmin, qmax, true, gf);
      double ds = 0.0, dz = 0.0;
      if (vec) {
        constexpr int N = Pack<S>::N;
        for (int64_t j = b / N + lane; j < e / N; j += plan::kWarp) {
          const Pack<S> ga = rows::load_pack(g, j);
          const Pack<S> xa = rows::load_pack(x, j);
          Pack<S> o;
#pragma unroll
          for (int u = 0; u < N; ++u) o.v[u] = one(IO::to(ga.v[u]), IO::to(xa.v[u]), k, ds, dz);
          rows::store_pack(gx, j, o);
        }
      } else {
        for (int64_t i = b + lane; i < e; i += plan::kWarp) {
          gx[i] = one(IO::to(g[i]), IO::to(x[i]), k, ds, dz);
        }
      }
      ds = rows::warp_sum(ds);
      dz = rows::warp_sum(dz);
      if (lane == 0) {
        part_s[item] = ds;  // item == slot_of(p, o, c, seg)
        part_z[item] = dz;
      }
    }
    return;
  }
  __shared__ double sh_s[plan::kBlock], sh_z[plan::kBlock];
  const int t = threadIdx.x;
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    plan::ShortThread st;
    double ds = 0.0, dz = 0.0;
    if (plan::short_thread(p, tile, t, &st)) {
      const auto k = kmath::make_fq_coef<T>(scale[st.c], zp[st.c], qmin, qmax, true, gf);
      int64_t i = st.base;
      for (int64_t it = 0, o = st.o0; it < plan::kIters && o < p.outer;
           ++it, o += p.rpi, i += st.step) {
        gx[i] = one(IO::to(g[i]), IO::to(x[i]), k, ds, dz);
      }
    }
    sh_s[t] = ds;
    sh_z[t] = dz;
    __syncthreads();
    const int64_t group = tile % p.groups, otile = tile / p.groups;
    const int64_t c = group * p.kc + t;
    if (t < p.kc && c < p.channels) {
      // Fixed order: phase by phase, element by element of the channel's columns.
      double s = 0.0, z = 0.0;
      for (int64_t ph = 0; ph < p.rpi; ++ph) {
        for (int64_t e = 0; e < p.inner; ++e) {
          const int64_t idx = ph * p.width + t * p.inner + e;
          s += sh_s[idx];
          z += sh_z[idx];
        }
      }
      const int64_t slot = plan::slot_of(p, otile, c, 0);
      part_s[slot] = s;
      part_z[slot] = z;
    }
    __syncthreads();
  }
}

// One warp per channel: lane l adds the channel's partials m = l, l + 32, ... in order, then a
// fixed shuffle tree. Writes float32 or float64 outputs.
__global__ void lsq_finalize_kernel(const double* __restrict__ part_s,
                                    const double* __restrict__ part_z, RowPlan p, void* out_s,
                                    bool s_double, void* out_z, bool z_double) {
  const int lane = threadIdx.x % plan::kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / plan::kWarp);
  const int64_t m_end = p.U * p.S;
  for (int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / plan::kWarp;
       c < p.channels; c += warps) {
    double s = 0.0, z = 0.0;
    for (int64_t m = lane; m < m_end; m += plan::kWarp) {
      const int64_t slot = plan::finalize_slot(p, c, m);
      s += part_s[slot];
      z += part_z[slot];
    }
    s = rows::warp_sum(s);
    z = rows::warp_sum(z);
    if (lane == 0) {
      if (s_double) {
        static_cast<double*>(out_s)[c] = s;
      } else {
        static_cast<float*>(out_s)[c] = static_cast<float>(s);
      }
      if (z_double) {
        static_cast<double*>(out_z)[c] = z;
      } else {
        static_cast<float*>(out_z)[c] = static_cast<float>(z);
      }
    }
  }
}

__global__ void check_params_kernel(const float* __restrict__ scale, const float* __restrict__ zp,
                                    int64_t channels, float qmin, float qmax, bool round_zp,
                                    int* bad) {
  int b = 0;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    if (!kmath::fq_params_ok(scale[c], zp[c], qmin, qmax, round_zp)) b = 1;
  }
  b = __syncthreads_or(b);
  if (threadIdx.x == 0) *bad = b;
}

template <typename S>
bool vec_ok(const RowPlan& p, std::initializer_list<const void*> ptrs) {
  if (!p.long_rows || p.inner % Pack<S>::N != 0) return false;
  for (const void* q : ptrs)
    if (!rows::aligned16(q)) return false;
  return true;
}

template <typename IO>
cudaError_t forward_impl(const void* x, void* y, const float* scale, const float* zp,
                         const RowPlan& p, float qmin, float qmax, bool round_zp,
                         cudaStream_t stream) {
  using S = typename IO::S;
  FwdVisitor<IO> v{static_cast<const S*>(x), static_cast<S*>(y), scale, zp, qmin, qmax, round_zp};
  fq_forward_kernel<IO><<<rows::row_blocks(p), plan::kBlock, 0, stream>>>(
      v, p, vec_ok<S>(p, {x, y}));
  return cudaGetLastError();
}

template <typename IO>
cudaError_t backward_impl(const void* g, const void* x, void* gx, const float* scale,
                          const float* zp, const RowPlan& p, float qmin, float qmax,
                          cudaStream_t stream) {
  using S = typename IO::S;
  BwdVisitor<IO> v{static_cast<const S*>(g), static_cast<const S*>(x), static_cast<S*>(gx),
                   scale, zp, qmin, qmax};
  fq_backward_kernel<IO><<<rows::row_blocks(p), plan::kBlock, 0, stream>>>(
      v, p, vec_ok<S>(p, {g, x, gx}));
  return cudaGetLastError();
}

template <typename IO>
cudaError_t lsq_impl(const void* g, const void* x, void* gx, const float* scale, const float* zp,
                     const RowPlan& p, float qmin, float qmax, float gf, double* part_s,
                     double* part_z, cudaStream_t stream) {
  using S = typename IO::S;
  lsq_backward_kernel<IO><<<rows::row_blocks(p), plan::kBlock, 0, stream>>>(
      static_cast<const S*>(g), static_cast<const S*>(x), static_cast<S*>(gx), scale, zp, p, qmin,
      qmax, gf, vec_ok<S>(p, {g, x, gx}), part_s, part_z);
  return cudaGetLastError();
}

RowPlan plan_of(FqShape s) { return plan::make_row_plan(s.outer, s.channels, s.inner); }

}  // namespace

cudaError_t fq_check_params(const float* scale, const float* zp, int64_t channels, float qmin,
                            float qmax, bool round_zp, int* bad, cudaStream_t stream) {
  check_params_kernel<<<1, plan::kBlock, 0, stream>>>(scale, zp, channels, qmin, qmax, round_zp,
                                                       bad);
  return cudaGetLastError();
}

cudaError_t fake_quant_forward(const void* x, void* y, FqDType dtype, const float* scale,
                               const float* zp, FqShape shape, float qmin, float qmax,
                               bool round_zp, cudaStream_t stream) {
  const RowPlan p = plan_of(shape);
  if (p.numel == 0) return cudaSuccess;
  switch (dtype) {
    case FqDType::kFloat32:
      return forward_impl<rows::F32>(x, y, scale, zp, p, qmin, qmax, round_zp, stream);
    case FqDType::kFloat64:
      return forward_impl<rows::F64>(x, y, scale, zp, p, qmin, qmax, round_zp, stream);
    case FqDType::kFloat16:
      return forward_impl<rows::F16>(x, y, scale, zp, p, qmin, qmax, round_zp, stream);
    case FqDType::kBFloat16:
      return forward_impl<rows::BF16>(x, y, scale, zp, p, qmin, qmax, round_zp, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t fake_quant_backward(const void* g, const void* x, void* gx, FqDType dtype,
                                const float* scale, const float* zp, FqShape shape, float qmin,
                                float qmax, cudaStream_t stream) {
  const RowPlan p = plan_of(shape);
  if (p.numel == 0) return cudaSuccess;
  switch (dtype) {
    case FqDType::kFloat32:
      return backward_impl<rows::F32>(g, x, gx, scale, zp, p, qmin, qmax, stream);
    case FqDType::kFloat64:
      return backward_impl<rows::F64>(g, x, gx, scale, zp, p, qmin, qmax, stream);
    case FqDType::kFloat16:
      return backward_impl<rows::F16>(g, x, gx, scale, zp, p, qmin, qmax, stream);
    case FqDType::kBFloat16:
      return backward_impl<rows::BF16>(g, x, gx, scale, zp, p, qmin, qmax, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t lsq_partial_slots(FqShape shape) { return plan::partial_slots(plan_of(shape)); }

cudaError_t lsq_backward(const void* g, const void* x, void* gx, FqDType dtype,
                         const float* scale, const float* zp, FqShape shape, float qmin,
                         float qmax, float grad_factor, double* part_s, double* part_z,
                         void* out_s, bool out_s_double, void* out_z, bool out_z_double,
                         cudaStream_t stream) {
  const RowPlan p = plan_of(shape);
  if (shape.channels == 0) return cudaSuccess;
  if (p.numel > 0) {
    cudaError_t err = cudaErrorInvalidValue;
    switch (dtype) {
      case FqDType::kFloat32:
        err = lsq_impl<rows::F32>(g, x, gx, scale, zp, p, qmin, qmax, grad_factor, part_s, part_z,
                                  stream);
        break;
      case FqDType::kFloat64:
        err = lsq_impl<rows::F64>(g, x, gx, scale, zp, p, qmin, qmax, grad_factor, part_s, part_z,
                                  stream);
        break;
      case FqDType::kFloat16:
        err = lsq_impl<rows::F16>(g, x, gx, scale, zp, p, qmin, qmax, grad_factor, part_s, part_z,
                                  stream);
        break;
      case FqDType::kBFloat16:
        err = lsq_impl<rows::BF16>(g, x, gx, scale, zp, p, qmin, qmax, grad_factor, part_s,
                                   part_z, stream);
        break;
    }
    if (err != cudaSuccess) return err;
  }
  // Empty x: U = 0 partials, the finalise writes zeros.
  const int64_t warps_per_block = plan::kBlock / plan::kWarp;
  int64_t blocks = (shape.channels + warps_per_block - 1) / warps_per_block;
  blocks = blocks > 16384 ? 16384 : blocks;
  lsq_finalize_kernel<<<static_cast<int>(blocks), plan::kBlock, 0, stream>>>(
      part_s, part_z, p, out_s, out_s_double, out_z, out_z_double);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ompq
