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
  struct In {
    S x;
  };
  struct InVec {
    Pack<S> x;
  };
  const S* x;
  S* y;
  const float* scale;
  const float* zp;
  float qmin, qmax;
  bool round_zp;
  __device__ __forceinline__ Coef coef(int64_t c) const {
    return kmath::make_fq_coef<T>(rows::ldg(scale + c), rows::ldg(zp + c), qmin, qmax, round_zp,
                                  1.0f);
  }
  __device__ __forceinline__ In load(int64_t i) const { return In{rows::ldg(x + i)}; }
  __device__ __forceinline__ void put(const Coef& k, const In& a, int64_t i) const {
    y[i] = IO::from(kmath::fq_forward<T>(IO::to(a.x), k));
  }
  __device__ __forceinline__ InVec load_vec(int64_t i) const { return InVec{rows::load_pack(x, i)}; }
  __device__ __forceinline__ void put_vec(const Coef& k, const InVec& a, int64_t i) const {
    Pack<S> o;
#pragma unroll
    for (int u = 0; u < Pack<S>::N; ++u) o.v[u] = IO::from(kmath::fq_forward<T>(IO::to(a.x.v[u]), k));
    rows::store_pack(y, i, o);
  }
};

template <typename IO>
struct BwdVisitor {
  using S = typename IO::S;
  using T = typename IO::T;
  using Coef = kmath::FqCoef<T>;
  struct In {
    S g, x;
  };
  struct InVec {
    Pack<S> g, x;
  };
  const S* g;
  const S* x;
  S* gx;
  const float* scale;
  const float* zp;
  float qmin, qmax;
  __device__ __forceinline__ Coef coef(int64_t c) const {
    return kmath::make_fq_coef<T>(rows::ldg(scale + c), rows::ldg(zp + c), qmin, qmax, false,
                                  1.0f);
  }
  __device__ __forceinline__ In load(int64_t i) const {
    return In{rows::ldg(g + i), rows::ldg(x + i)};
  }
  __device__ __forceinline__ void put(const Coef& k, const In& a, int64_t i) const {
    gx[i] = IO::from(kmath::fq_backward<T>(IO::to(a.g), IO::to(a.x), k));
  }
  __device__ __forceinline__ InVec load_vec(int64_t i) const {
    return InVec{rows::load_pack(g, i), rows::load_pack(x, i)};
  }
  __device__ __forceinline__ void put_vec(const Coef& k, const InVec& a, int64_t i) const {
    Pack<S> o;
#pragma unroll
    for (int u = 0; u < Pack<S>::N; ++u) {
      o.v[u] = IO::from(kmath::fq_backward<T>(IO::to(a.g.v[u]), IO::to(a.x.v[u]), k));
    }
    rows::store_pack(gx, i, o);
  }
};

template <typename IO>
__global__ void __launch_bounds__(plan::kBlock) fq_forward_kernel(FwdVisitor<IO> v, RowPlan p,
                                                                  int shift) {
  rows::for_each_element<typename IO::S>(p, shift, v);
}

template <typename IO>
__global__ void __launch_bounds__(plan::kBlock) fq_backward_kernel(BwdVisitor<IO> v, RowPlan p,
                                                                   int shift) {
  rows::for_each_element<typename IO::S>(p, shift, v);
}

// LSQ backward: gx per element, per-item (long rows) or per-(outer tile, channel) (short rows)
// partial sums of the scale / zero-point gradient terms, in fp64, written with plain stores.
// Long rows: lane l owns the N-element chunks q = l, l + 32, ... of its segment (N = elements
// per 16-byte pack) and adds their terms in order; a chunk is read with one pack load per array
// when the segment start is aligned (shift >= 0 and (b + shift) % N == 0), else with N scalar
// loads. The summation order depends only on the shape, never on the pointers' alignment.
// Short rows: each thread walks its column kUnroll iterations at a time (loads first).
template <typename IO>
__global__ void __launch_bounds__(plan::kBlock)
    lsq_backward_kernel(const typename IO::S* __restrict__ g, const typename IO::S* __restrict__ x,
                        typename IO::S* __restrict__ gx, const float* __restrict__ scale,
                        const float* __restrict__ zp, RowPlan p, float qmin, float qmax,
                        float gf, int shift, double* __restrict__ part_s,
                        double* __restrict__ part_z) {
  using S = typename IO::S;
  using T = typename IO::T;
  constexpr int N = Pack<S>::N;
  constexpr int U = rows::kUnroll / 2 > 0 ? rows::kUnroll / 2 : 1;  // chunks in flight per lane
  auto one = [&](S gv, S xv, const kmath::FqCoef<T>& k, double& ds, double& dz) -> S {
    T a, b;
    const T r = kmath::lsq_backward<T>(IO::to(gv), IO::to(xv), k, &a, &b);
    ds += static_cast<double>(a);
    dz += static_cast<double>(b);
    return IO::from(r);
  };
  auto coef = [&](int64_t c) {
    return kmath::make_fq_coef<T>(rows::ldg(scale + c), rows::ldg(zp + c), qmin, qmax, true, gf);
  };
  if (p.long_rows) {
    rows::for_each_warp_item(p, [&](int64_t item, int lane, int64_t c, int64_t b, int64_t e) {
      const auto k = coef(c);
      const bool vseg = shift >= 0 && ((b + shift) & (N - 1)) == 0;
      double ds = 0.0, dz = 0.0;
      for (int64_t q0 = b + static_cast<int64_t>(lane) * N; q0 < e; q0 += U * plan::kWarp * N) {
        Pack<S> ga[U], xa[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t q = q0 + static_cast<int64_t>(u) * plan::kWarp * N;
          if (vseg && q + N <= e) {
            ga[u] = rows::load_pack(g, q);
            xa[u] = rows::load_pack(x, q);
          } else {
#pragma unroll
            for (int n = 0; n < N; ++n) {
              const bool in = q + n < e;
              ga[u].v[n] = in ? rows::ldg(g + q + n) : S();
              xa[u].v[n] = in ? rows::ldg(x + q + n) : S();
            }
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int64_t q = q0 + static_cast<int64_t>(u) * plan::kWarp * N;
          if (q >= e) continue;
          Pack<S> o;
#pragma unroll
          for (int n = 0; n < N; ++n) {
            if (q + n < e) o.v[n] = one(ga[u].v[n], xa[u].v[n], k, ds, dz);
          }
          if (vseg && q + N <= e) {
            rows::store_pack(gx, q, o);
          } else {
#pragma unroll
            for (int n = 0; n < N; ++n) {
              if (q + n < e) gx[q + n] = o.v[n];
            }
          }
        }
      }
      ds = rows::warp_sum(ds);
      dz = rows::warp_sum(dz);
      if (lane == 0) {
        part_s[item] = ds;  // item == slot_of(p, o, c, seg)
        part_z[item] = dz;
      }
    });
    return;
  }
  __shared__ double sh_s[plan::kBlock], sh_z[plan::kBlock];
  const int t = threadIdx.x;
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    plan::ShortThread st;
    double ds = 0.0, dz = 0.0;
    if (plan::short_thread(p, tile, t, &st)) {
      const auto k = coef(st.c);
      const int64_t end = st.base + plan::short_iters(p, st) * st.step;
      for (int64_t i = st.base; i < end; i += rows::kUnroll * st.step) {
        S ga[rows::kUnroll], xa[rows::kUnroll];
#pragma unroll
        for (int u = 0; u < rows::kUnroll; ++u) {
          const int64_t j = i + u * st.step;
          ga[u] = j < end ? rows::ldg(g + j) : S();
          xa[u] = j < end ? rows::ldg(x + j) : S();
        }
#pragma unroll
        for (int u = 0; u < rows::kUnroll; ++u) {
          const int64_t j = i + u * st.step;
          if (j < end) gx[j] = one(ga[u], xa[u], k, ds, dz);
        }
      }
    }
    sh_s[t] = ds;
    sh_z[t] = dz;
    __syncthreads();
    const int64_t c = st.group * p.kc + t;  // st.group / st.otile are set for every t
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
      const int64_t slot = plan::slot_of(p, st.otile, c, 0);
      part_s[slot] = s;
      part_z[slot] = z;
    }
    __syncthreads();
  }
}

// out[i] = v, stored as float64 when dbl, else rounded to float32.
__device__ __forceinline__ void store_out(void* out, bool dbl, int64_t i, double v) {
  if (dbl) {
    static_cast<double*>(out)[i] = v;
  } else {
    static_cast<float*>(out)[i] = static_cast<float>(v);
  }
}

// One finalise level (kernel_plan.h, "LSQ finalise"): block b sums range fin_block(b) of its
// channel (thread t: m = m0 + t, m0 + t + 256, ... in order, slots stepped incrementally), then
// a fixed shared-memory tree; writes out[b] (b = c * chunks + k) as float32 or float64.
__global__ void __launch_bounds__(plan::kFinThreads)
    lsq_finalize_kernel(const double* __restrict__ part_s, const double* __restrict__ part_z,
                        plan::FinMap map, int64_t chunks, int64_t channels, void* out_s,
                        bool s_double, void* out_z, bool z_double) {
  __shared__ double sh_s[plan::kFinThreads], sh_z[plan::kFinThreads];
  const int t = threadIdx.x;
  for (int64_t b = blockIdx.x; b < channels * chunks; b += gridDim.x) {
    int64_t c, m0, m1;
    plan::fin_block(b, chunks, map.M, &c, &m0, &m1);
    double s = 0.0, z = 0.0;
    for (plan::FinCursor cur = plan::fin_cursor(map, c, m0, m1, t); cur.m < cur.end;
         plan::fin_next(map, &cur)) {
      s += rows::ldg(part_s + cur.slot);
      z += rows::ldg(part_z + cur.slot);
    }
    sh_s[t] = s;
    sh_z[t] = z;
    __syncthreads();
    plan::fin_tree_steps([&](int off) {
      if (t < off) {
        sh_s[t] += sh_s[t + off];
        sh_z[t] += sh_z[t + off];
      }
      __syncthreads();
    });
    if (t == 0) {
      store_out(out_s, s_double, b, sh_s[0]);
      store_out(out_z, z_double, b, sh_z[0]);
    }
    __syncthreads();  // sh_* reused by the next block index
  }
}

// Finalise for channels with M <= 32 partials: one warp per channel, lane l reads partial l,
// a fixed shuffle tree adds them (bitwise reproducible; no block barriers).
__global__ void lsq_finalize_warp_kernel(const double* __restrict__ part_s,
                                         const double* __restrict__ part_z, plan::FinMap map,
                                         int64_t channels, void* out_s, bool s_double,
                                         void* out_z, bool z_double) {
  const int lane = threadIdx.x % plan::kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / plan::kWarp);
  for (int64_t c = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / plan::kWarp;
       c < channels; c += warps) {  // warp-uniform loop
    double s = 0.0, z = 0.0;
    if (lane < map.M) {
      const int64_t slot = plan::fin_slot(map, c, lane);
      s = rows::ldg(part_s + slot);
      z = rows::ldg(part_z + slot);
    }
    s = rows::warp_sum(s);
    z = rows::warp_sum(z);
    if (lane == 0) {
      store_out(out_s, s_double, c, s);
      store_out(out_z, z_double, c, z);
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

template <typename IO>
cudaError_t forward_impl(const void* x, void* y, const float* scale, const float* zp,
                         const RowPlan& p, float qmin, float qmax, bool round_zp,
                         cudaStream_t stream) {
  using S = typename IO::S;
  FwdVisitor<IO> v{static_cast<const S*>(x), static_cast<S*>(y), scale, zp, qmin, qmax, round_zp};
  fq_forward_kernel<IO><<<rows::row_blocks(p), plan::kBlock, 0, stream>>>(
      v, p, rows::pack_shift<S>({x, y}));
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
      v, p, rows::pack_shift<S>({g, x, gx}));
  return cudaGetLastError();
}

template <typename IO>
cudaError_t lsq_impl(const void* g, const void* x, void* gx, const float* scale, const float* zp,
                     const RowPlan& p, float qmin, float qmax, float gf, double* part_s,
                     double* part_z, cudaStream_t stream) {
  using S = typename IO::S;
  lsq_backward_kernel<IO><<<rows::row_blocks(p), plan::kBlock, 0, stream>>>(
      static_cast<const S*>(g), static_cast<const S*>(x), static_cast<S*>(gx), scale, zp, p, qmin,
      qmax, gf, rows::pack_shift<S>({g, x, gx}), part_s, part_z);
  return cudaGetLastError();
}

// Calls f(IO{}) with the rows::F32 / F64 / F16 / BF16 storage-and-compute type of dtype.
template <typename F>
cudaError_t with_io(FqDType dtype, F&& f) {
  switch (dtype) {
    case FqDType::kFloat32:
      return f(rows::F32{});
    case FqDType::kFloat64:
      return f(rows::F64{});
    case FqDType::kFloat16:
      return f(rows::F16{});
    case FqDType::kBFloat16:
      return f(rows::BF16{});
  }
  return cudaErrorInvalidValue;
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
  return with_io(dtype, [&](auto io) {
    return forward_impl<decltype(io)>(x, y, scale, zp, p, qmin, qmax, round_zp, stream);
  });
}

cudaError_t fake_quant_backward(const void* g, const void* x, void* gx, FqDType dtype,
                                const float* scale, const float* zp, FqShape shape, float qmin,
                                float qmax, cudaStream_t stream) {
  const RowPlan p = plan_of(shape);
  if (p.numel == 0) return cudaSuccess;
  return with_io(dtype, [&](auto io) {
    return backward_impl<decltype(io)>(g, x, gx, scale, zp, p, qmin, qmax, stream);
  });
}

int64_t lsq_scratch_doubles(FqShape shape) { return plan::lsq_scratch_doubles(plan_of(shape)); }

cudaError_t lsq_backward(const void* g, const void* x, void* gx, FqDType dtype,
                         const float* scale, const float* zp, FqShape shape, float qmin,
                         float qmax, float grad_factor, double* scratch, void* out_s,
                         bool out_s_double, void* out_z, bool out_z_double,
                         cudaStream_t stream) {
  const RowPlan p = plan_of(shape);
  if (shape.channels == 0) return cudaSuccess;
  const int64_t slots = plan::partial_slots(p);
  double* part_s = scratch;
  double* part_z = scratch + slots;
  if (p.numel > 0) {
    const cudaError_t err = with_io(dtype, [&](auto io) {
      return lsq_impl<decltype(io)>(g, x, gx, scale, zp, p, qmin, qmax, grad_factor, part_s,
                                    part_z, stream);
    });
    if (err != cudaSuccess) return err;
  }
  // Empty x: M = 0 partials, the finalise writes zeros.
  const plan::FinMap map = plan::row_fin_map(p);
  const int64_t chunks = plan::fin_chunks(map.M);
  auto grid = [](int64_t blocks) { return plan::capped_blocks(blocks, 65535); };  // blocks >= 1
  if (plan::fin_by_warp(map.M)) {
    const int64_t warps_per_block = plan::kFinThreads / plan::kWarp;
    lsq_finalize_warp_kernel<<<grid((shape.channels + warps_per_block - 1) / warps_per_block),
                               plan::kFinThreads, 0, stream>>>(
        part_s, part_z, map, shape.channels, out_s, out_s_double, out_z, out_z_double);
  } else if (chunks > 1) {  // two levels: chunk sums into level2, then one block per channel
    double* l2_s = scratch + 2 * slots;
    double* l2_z = l2_s + shape.channels * chunks;
    lsq_finalize_kernel<<<grid(shape.channels * chunks), plan::kFinThreads, 0, stream>>>(
        part_s, part_z, map, chunks, shape.channels, l2_s, true, l2_z, true);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    lsq_finalize_kernel<<<grid(shape.channels), plan::kFinThreads, 0, stream>>>(
        l2_s, l2_z, plan::chunk_fin_map(chunks), 1, shape.channels, out_s, out_s_double, out_z,
        out_z_double);
  } else {
    lsq_finalize_kernel<<<grid(shape.channels), plan::kFinThreads, 0, stream>>>(
        part_s, part_z, map, 1, shape.channels, out_s, out_s_double, out_z, out_z_double);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ompq
