// Fake quantization (STE) and LSQ fake quantization, CPU kernels.
//
// Ops (namespace `ompq`, schemas declared here in a TORCH_LIBRARY_FRAGMENT):
//   fake_quant(x, scale, zero_point, qmin, qmax, axis=None) -> y
//   fake_quant_backward(grad, x, scale, zero_point, qmin, qmax, axis=None) -> grad_x
//   lsq_fake_quant(x, scale, zero_point, qmin, qmax, axis=None, grad_factor=1.0) -> y
//   lsq_fake_quant_backward(grad, x, scale, zero_point, qmin, qmax, axis=None, grad_factor=1.0)
//       -> (grad_x, grad_scale, grad_zero_point)
//
// Semantics (identical to torch's fake-quant kernels for float32, see ompq/reference.py):
//   inv = 1.0f / scale                           (float32, like torch)
//   q   = clamp(nearbyint(x * inv) + zp, qmin, qmax)      (round half to even)
//   y   = (q - zp) * scale
// fake_quant uses the zero point as given (it must lie in [qmin, qmax], like torch);
// lsq_fake_quant first rounds (half to even) and clamps the zero point to [qmin, qmax], like
// torch._fake_quantize_learnable_per_{tensor,channel}_affine.
// Backward of fake_quant: grad * (qmin <= nearbyint(x * inv) + zp <= qmax).
// Backward of lsq_fake_quant (torch's learnable formulas, computed from x; no saved mask):
//   xq = nearbyint(zp + x * inv)
//   inside:  grad_x = grad, grad_s += ((grad * ((clamp(xq) - zp) * s - x)) * inv) * grad_factor
//   below:   grad_x = 0,    grad_s += (grad * (qmin - zp)) * grad_factor, grad_zp += -grad*s*gf
//   above:   grad_x = 0,    grad_s += (grad * (qmax - zp)) * grad_factor, grad_zp += -grad*s*gf
// NaN/Inf in x: +Inf saturates to qmax, -Inf and NaN to qmin (torch's per-tensor behaviour), and
// all three count as "outside" for the gradients (grad_x = 0; NaN and -Inf as below, +Inf as
// above). torch's per-channel and learnable kernels convert to int64 before clamping, which
// overflows for |x / scale| >= 2**63 (including +-Inf): there they clamp such values to qmin.
// We saturate consistently instead; finite values below that bound agree bit for bit.
//
// Layout: x is viewed as [outer, C, inner] with C = x.size(axis) (C = 1 for per-tensor). The
// flat index range is cut into a fixed number of chunks (independent of the thread count, so
// reductions are deterministic), chunks run in parallel (at::parallel_for), and each chunk walks
// the rows of `inner` contiguous elements that share one channel with at::vec::Vectorized code.
// float32 and float64 are computed natively; float16/bfloat16 are converted to float32 in small
// blocks (as torch's reduced-precision kernels compute in float).

#include "vec_capability.h"  // first: picks the at::vec implementation

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <limits>
#include <sstream>
#include <tuple>
#include <vector>

#include "fake_quant_checks.h"

namespace ompq {
namespace {

using at::Tensor;
using at::vec::Vectorized;

// Non-temporal (streaming) stores for outputs much larger than the last-level cache: they skip
// the read-for-ownership of the destination lines, which otherwise costs a third memory stream.
// Used only where at::vec maps to AVX2/AVX-512 registers and the destination is aligned.
int64_t stream_threshold_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("OMPQ_STREAM_BYTES");
    return e ? std::atoll(e) : (int64_t(24) << 20);
  }();
  return v;
}

template <typename T>
inline bool stream_store(const Vectorized<T>& v, T* p) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same<T, float>::value) {
    _mm512_stream_ps(p, v);
  } else {
    _mm512_stream_pd(p, v);
  }
  return true;
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    _mm256_stream_ps(p, v);
  } else {
    _mm256_stream_pd(p, v);
  }
  return true;
#else
  v.store(p);
  return false;
#endif
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Number of leading elements to process before p + head is aligned to a full vector.
template <typename T>
inline int64_t head_to_align(const T* p, int64_t n) {
  constexpr int64_t bytes = Vectorized<T>::size() * sizeof(T);
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % bytes);
  if (mis % sizeof(T) != 0) return n;  // cannot align: all scalar (never for torch tensors)
  return std::min<int64_t>(n, mis == 0 ? 0 : (bytes - mis) / sizeof(T));
}

// Argument checks: csrc/cpu/fake_quant_checks.h (shared with the CUDA glue).
using fq_checks::check_and_layout;
using fq_checks::check_grad;
using fq_checks::check_grad_factor;
using fq_checks::Layout;
using fq_checks::Params;
using fq_checks::read_params;

// Per-channel coefficients of the element kernels.
template <typename T>
struct Coef {
  T s, inv, z, qmin, qmax, gf;
};

// ---------------------------------------------------------------------------------------------
// Cheap compares and selects. at::vec's comparison operators return all-ones/all-zeros vectors
// and its blendv turns them back into a mask; on AVX-512 that is two extra instructions per
// compare and per blend, enough to make these kernels compute-bound on cache-resident tensors.
// Where at::vec maps to AVX-512 these helpers use the mask registers directly; elsewhere they
// are at::vec's own operators (AVX2's compare and blend are single instructions already).
// ---------------------------------------------------------------------------------------------

#if defined(CPU_CAPABILITY_AVX512)
inline __mmask16 vge(const Vectorized<float>& a, const Vectorized<float>& b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ);
}
inline __mmask16 vle(const Vectorized<float>& a, const Vectorized<float>& b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ);
}
inline __mmask16 vgt(const Vectorized<float>& a, const Vectorized<float>& b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ);
}
inline __mmask8 vge(const Vectorized<double>& a, const Vectorized<double>& b) {
  return _mm512_cmp_pd_mask(a, b, _CMP_GE_OQ);
}
inline __mmask8 vle(const Vectorized<double>& a, const Vectorized<double>& b) {
  return _mm512_cmp_pd_mask(a, b, _CMP_LE_OQ);
}
inline __mmask8 vgt(const Vectorized<double>& a, const Vectorized<double>& b) {
  return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ);
}
// m ? t : f, lane by lane.
inline Vectorized<float> vselect(__mmask16 m, const Vectorized<float>& t,
                                 const Vectorized<float>& f) {
  return _mm512_mask_blend_ps(m, f, t);
}
inline Vectorized<double> vselect(__mmask8 m, const Vectorized<double>& t,
                                  const Vectorized<double>& f) {
  return _mm512_mask_blend_pd(m, f, t);
}
#else
template <typename T>
inline Vectorized<T> vge(const Vectorized<T>& a, const Vectorized<T>& b) { return a >= b; }
template <typename T>
inline Vectorized<T> vle(const Vectorized<T>& a, const Vectorized<T>& b) { return a <= b; }
template <typename T>
inline Vectorized<T> vgt(const Vectorized<T>& a, const Vectorized<T>& b) { return a > b; }
template <typename T>
inline Vectorized<T> vselect(const Vectorized<T>& m, const Vectorized<T>& t,
                             const Vectorized<T>& f) {
  return Vectorized<T>::blendv(f, t, m);
}
#endif

// max(a, lo), with NaN lanes of a mapped to lo (x86 MAXPS/MAXPD return the second operand
// when either is NaN; at::vec::maximum would propagate the NaN).
template <typename T>
inline Vectorized<T> vmax_or_lo(const Vectorized<T>& a, const Vectorized<T>& lo) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same<T, float>::value) {
    return _mm512_max_ps(a, lo);
  } else {
    return _mm512_max_pd(a, lo);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same<T, float>::value) {
    return _mm256_max_ps(a, lo);
  } else {
    return _mm256_max_pd(a, lo);
  }
#else
  return vselect(vge(a, lo), a, lo);
#endif
}

// ---------------------------------------------------------------------------------------------
// Element kernels on contiguous segments that share one channel. T is float or double.
//
// The vector code clamps t = nearbyint(x * inv) to [qmin - zp, qmax - zp] and multiplies by the
// scale, which equals (clamp(t + zp, qmin, qmax) - zp) * scale bit for bit: t, zp, qmin and qmax
// are integers and every sum and difference below 2**24 is exact, and a |t| too large for that
// is clamped to the same bound either way. Adding +0 turns t = -0 into +0, as t + zp - zp does.
// The scalar heads and tails evaluate the textbook formula (no FMA contraction: the extension
// is built with -ffp-contract=off), so results do not depend on alignment.
// ---------------------------------------------------------------------------------------------

template <typename T>
inline T fq_scalar(T x, const Coef<T>& k) {
  T q = std::nearbyint(x * k.inv) + k.z;
  if (!(q >= k.qmin)) q = k.qmin;  // NaN and -Inf go to qmin
  if (q > k.qmax) q = k.qmax;
  return (q - k.z) * k.s;
}

template <typename T, bool kStream>
void fq_forward_seg_impl(const T* x, T* y, int64_t n, const Coef<T>& k) {
  using V = Vectorized<T>;
  const V vinv(k.inv), vs(k.s), vlo(k.qmin - k.z), vhi(k.qmax - k.z), pzero(T(0));
  auto quant = [&](const V& xv) {
    // clamp_max is one MINPS here (its operand order only matters for NaN, already gone).
    return at::vec::clamp_max(vmax_or_lo((xv * vinv).round() + pzero, vlo), vhi) * vs;
  };
  int64_t i = 0;
  if (kStream) {
    for (const int64_t h = head_to_align(y, n); i < h; ++i) y[i] = fq_scalar(x[i], k);
  }
  for (; i + V::size() <= n; i += V::size()) {
    const V out = quant(V::loadu(x + i));
    if (kStream) {
      stream_store(out, y + i);
    } else {
      out.store(y + i);
    }
  }
  if (i < n) {  // partial vector (masked load/store on AVX-512): same arithmetic as above
    const int64_t m = n - i;
    quant(V::loadu(x + i, m)).store(y + i, m);
  }
}

template <typename T>
void fq_forward_seg(const T* x, T* y, int64_t n, const Coef<T>& k, bool stream = false) {
  if (stream) {
    fq_forward_seg_impl<T, true>(x, y, n, k);
  } else {
    fq_forward_seg_impl<T, false>(x, y, n, k);
  }
}

template <typename T, bool kStream>
void fq_backward_seg_impl(const T* g, const T* x, T* gx, int64_t n, const Coef<T>& k) {
  using V = Vectorized<T>;
  const V vinv(k.inv), vlo(k.qmin - k.z), vhi(k.qmax - k.z), one(T(1)), zero(T(0));
  auto scalar = [&](int64_t j) {
    const T q = std::nearbyint(x[j] * k.inv) + k.z;
    gx[j] = g[j] * static_cast<T>(q >= k.qmin && q <= k.qmax);
  };
  // grad * (1 inside, 0 outside or NaN): a multiply, like torch, so Inf * 0 = NaN.
  auto ste = [&](const V& gv, const V& xv) {
    const V t = (xv * vinv).round();
    return gv * vselect(vge(t, vlo) & vle(t, vhi), one, zero);
  };
  int64_t i = 0;
  if (kStream) {
    for (const int64_t h = head_to_align(gx, n); i < h; ++i) scalar(i);
  }
  for (; i + V::size() <= n; i += V::size()) {
    const V out = ste(V::loadu(g + i), V::loadu(x + i));
    if (kStream) {
      stream_store(out, gx + i);
    } else {
      out.store(gx + i);
    }
  }
  if (i < n) {  // partial vector
    const int64_t m = n - i;
    ste(V::loadu(g + i, m), V::loadu(x + i, m)).store(gx + i, m);
  }
}

template <typename T>
void fq_backward_seg(const T* g, const T* x, T* gx, int64_t n, const Coef<T>& k,
                     bool stream = false) {
  if (stream) {
    fq_backward_seg_impl<T, true>(g, x, gx, n, k);
  } else {
    fq_backward_seg_impl<T, false>(g, x, gx, n, k);
  }
}

// One element of the LSQ backward, in torch's operation order (terms multiplied by grad_factor
// last, so PTQ/QAT results do not depend on how the per-channel constants are folded).
template <typename T>
inline void lsq_scalar(T g, T x, T* gx, double& ds, double& dz, const Coef<T>& k) {
  const T xq = std::nearbyint(k.z + x * k.inv);
  const bool inside = xq >= k.qmin && xq <= k.qmax;
  *gx = g * static_cast<T>(inside);
  if (inside) {
    const T xfq = (xq - k.z) * k.s;
    ds += static_cast<double>(((g * (xfq - x)) * k.inv) * k.gf);
  } else {
    const T bound = (xq > k.qmax) ? (k.qmax - k.z) : (k.qmin - k.z);  // NaN counts as below
    ds += static_cast<double>((g * bound) * k.gf);
    dz += static_cast<double>(((g * T(-1)) * k.s) * k.gf);
  }
}

template <typename T>
double hsum(const Vectorized<T>& v) {
  T buf[Vectorized<T>::size()];
  v.store(buf);
  double s = 0.0;
  for (int j = 0; j < Vectorized<T>::size(); ++j) s += static_cast<double>(buf[j]);
  return s;
}

// kUnitGf: grad_factor == 1, whose multiplications are exact no-ops and are skipped.
template <typename T, bool kStream, bool kUnitGf>
void lsq_backward_seg_impl(const T* g, const T* x, T* gx, int64_t n, const Coef<T>& k,
                           double& ds, double& dz) {
  using V = Vectorized<T>;
  const V vinv(k.inv), vs(k.s), vz(k.z), vqmin(k.qmin), vqmax(k.qmax), vgf(k.gf), one(T(1));
  const V vlow(k.qmin - k.z), vhigh(k.qmax - k.z), vneg1(T(-1)), zero(T(0));
  constexpr int64_t kFlush = 512;  // vectors accumulated in T before flushing into double
  int64_t i = 0;
  if (kStream) {
    for (const int64_t h = head_to_align(gx, n); i < h; ++i) {
      lsq_scalar(g[i], x[i], gx + i, ds, dz, k);
    }
  }
  V acc_s(T(0)), acc_z(T(0));
  // One vector of elements [i, i + m); lanes past m are loaded as g = 0, x = 0 and contribute
  // exactly 0 to both sums (x = 0 quantizes inside the range, where the term is g * ... = 0).
  auto step = [&](int64_t m) {
    const bool full = m == V::size();
    const V gv = full ? V::loadu(g + i) : V::loadu(g + i, m);
    const V xv = full ? V::loadu(x + i) : V::loadu(x + i, m);
    const V xq = (vz + xv * vinv).round();
    const auto inside = vge(xq, vqmin) & vle(xq, vqmax);  // NaN: outside, below
    const V out = gv * vselect(inside, one, zero);
    if (!full) {
      out.store(gx + i, m);
    } else if (kStream) {
      stream_store(out, gx + i);
    } else {
      out.store(gx + i);
    }
    // Inside, xq is already in [qmin, qmax]: the clamp of the scalar formula is a no-op there,
    // and the inside term is discarded (possibly NaN for infinite x) everywhere else.
    // Both grad_scale terms end with "* gf": selecting first and multiplying once gives the
    // same bits as multiplying each.
    const V ds_in = (gv * ((xq - vz) * vs - xv)) * vinv;
    const V ds_out = gv * vselect(vgt(xq, vqmax), vhigh, vlow);
    const V s_term = vselect(inside, ds_in, ds_out);
    const V z_term = (gv * vneg1) * vs;
    if constexpr (kUnitGf) {
      acc_s = acc_s + s_term;
      acc_z = acc_z + vselect(inside, zero, z_term);
    } else {
      acc_s = acc_s + s_term * vgf;
      acc_z = acc_z + vselect(inside, zero, z_term * vgf);
    }
  };
  int64_t since_flush = 0;
  for (; i + V::size() <= n; i += V::size()) {
    step(V::size());
    if (++since_flush == kFlush) {  // flush the T accumulators into double
      ds += hsum(acc_s);
      dz += hsum(acc_z);
      acc_s = V(T(0));
      acc_z = V(T(0));
      since_flush = 0;
    }
  }
  if (i < n) step(n - i);
  ds += hsum(acc_s);
  dz += hsum(acc_z);
}

template <typename T>
void lsq_backward_seg(const T* g, const T* x, T* gx, int64_t n, const Coef<T>& k, double& ds,
                      double& dz, bool stream = false) {
  const bool unit = k.gf == T(1);
  if (stream) {
    unit ? lsq_backward_seg_impl<T, true, true>(g, x, gx, n, k, ds, dz)
         : lsq_backward_seg_impl<T, true, false>(g, x, gx, n, k, ds, dz);
  } else {
    unit ? lsq_backward_seg_impl<T, false, true>(g, x, gx, n, k, ds, dz)
         : lsq_backward_seg_impl<T, false, false>(g, x, gx, n, k, ds, dz);
  }
}

// ---------------------------------------------------------------------------------------------
// Chunked, parallel traversal of [outer, C, inner].
// ---------------------------------------------------------------------------------------------

constexpr int64_t kMinChunk = 16384;  // elements per chunk (at least)
constexpr int64_t kMaxChunks = 64;

int64_t num_chunks(const Layout& l) {
  int64_t k = std::max<int64_t>(1, std::min<int64_t>(kMaxChunks, l.numel / kMinChunk));
  // At most 2^20 / C chunks. This cap once bounded a dense chunks x C array of partial sums
  // (ChunkSlots replaced it and needs no cap). It stays because the chunk bounds fix the order
  // in which the LSQ reductions add their partial sums: changing it would change grad_scale /
  // grad_zero_point in the last bits.
  k = std::min<int64_t>(k, std::max<int64_t>(1, (int64_t(1) << 20) / l.channels));
  return k;
}

// First element of chunk k of `chunks` equal chunks of [0, numel) (chunk k is
// [chunk_begin(k), chunk_begin(k + 1))).
inline int64_t chunk_begin(int64_t numel, int64_t chunks, int64_t k) {
  return numel * k / chunks;
}

// Calls f(chunk, begin, length, channel) for every run of elements that share one channel.
template <typename F>
void for_each_run(const Layout& l, F&& f) {
  const int64_t n = l.numel;
  if (n == 0) return;
  const int64_t chunks = num_chunks(l);
  at::parallel_for(0, chunks, 1, [&](int64_t kb, int64_t ke) {
    for (int64_t k = kb; k < ke; ++k) {
      const int64_t b = chunk_begin(n, chunks, k);
      const int64_t e = chunk_begin(n, chunks, k + 1);
      int64_t pos = b;
      int64_t row = b / l.inner;
      while (pos < e) {
        const int64_t row_end = std::min(e, (row + 1) * l.inner);
        f(k, pos, row_end - pos, row % l.channels);
        pos = row_end;
        ++row;
      }
    }
    stream_fence();  // order any streaming stores before the parallel region ends
  });
}

// Where for_each_run's chunks keep their per-channel partial sums. A chunk spanning R rows of
// `inner` elements touches min(R, C) channels: with R <= C the rows are distinct channels and
// slot j holds row first_row + j; with R > C slot j holds channel j. The buffer thus holds about
// numel / inner + chunks entries (a dense chunks x C array would hold up to 1M).
struct ChunkSlots {
  int64_t chunks = 0, channels = 1, total = 0;
  std::vector<int64_t> first_row, rows, offset;

  explicit ChunkSlots(const Layout& l) : channels(l.channels) {
    chunks = l.numel > 0 ? num_chunks(l) : 0;
    first_row.resize(chunks);
    rows.resize(chunks);
    offset.resize(chunks);
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t b = chunk_begin(l.numel, chunks, k);
      const int64_t e = chunk_begin(l.numel, chunks, k + 1);
      first_row[k] = b / l.inner;
      rows[k] = e > b ? (e - 1) / l.inner - first_row[k] + 1 : 0;
      offset[k] = total;
      total += size(k);
    }
  }
  int64_t size(int64_t k) const { return std::min(rows[k], channels); }
  int64_t index(int64_t k, int64_t row) const {
    return offset[k] + (rows[k] <= channels ? row - first_row[k] : row % channels);
  }
  int64_t channel(int64_t k, int64_t j) const {
    return rows[k] <= channels ? (first_row[k] + j) % channels : j;
  }
};

template <typename T>
Coef<T> coef(const Params& p, int64_t c, int64_t qmin, int64_t qmax, double gf) {
  return Coef<T>{static_cast<T>(p.scale[c]), static_cast<T>(p.inv[c]), static_cast<T>(p.zp[c]),
                 static_cast<T>(qmin),       static_cast<T>(qmax),     static_cast<T>(static_cast<float>(gf))};
}

// Reduced precision (Half/BFloat16): convert blocks to float, run the float kernel, convert back.
constexpr int64_t kBlock = 256;

template <typename S>
void forward_run(const S* x, S* y, int64_t n, const Coef<float>& k, bool /*stream*/) {
  float xb[kBlock], yb[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    for (int64_t j = 0; j < m; ++j) xb[j] = static_cast<float>(x[i + j]);
    fq_forward_seg<float>(xb, yb, m, k);
    for (int64_t j = 0; j < m; ++j) y[i + j] = static_cast<S>(yb[j]);
  }
}

template <typename S>
void backward_run(const S* g, const S* x, S* gx, int64_t n, const Coef<float>& k,
                  bool /*stream*/) {
  float gb[kBlock], xb[kBlock], ob[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    for (int64_t j = 0; j < m; ++j) {
      gb[j] = static_cast<float>(g[i + j]);
      xb[j] = static_cast<float>(x[i + j]);
    }
    fq_backward_seg<float>(gb, xb, ob, m, k);
    for (int64_t j = 0; j < m; ++j) gx[i + j] = static_cast<S>(ob[j]);
  }
}

template <typename S>
void lsq_run(const S* g, const S* x, S* gx, int64_t n, const Coef<float>& k, double& ds,
             double& dz, bool /*stream*/) {
  float gb[kBlock], xb[kBlock], ob[kBlock];
  for (int64_t i = 0; i < n; i += kBlock) {
    const int64_t m = std::min(kBlock, n - i);
    for (int64_t j = 0; j < m; ++j) {
      gb[j] = static_cast<float>(g[i + j]);
      xb[j] = static_cast<float>(x[i + j]);
    }
    lsq_backward_seg<float>(gb, xb, ob, m, k, ds, dz);
    for (int64_t j = 0; j < m; ++j) gx[i + j] = static_cast<S>(ob[j]);
  }
}

// Native float/double versions.
#define OMPQ_NATIVE(T)                                                                      \
  void forward_run(const T* x, T* y, int64_t n, const Coef<T>& k, bool stream) {             \
    fq_forward_seg<T>(x, y, n, k, stream);                                                    \
  }                                                                                           \
  void backward_run(const T* g, const T* x, T* gx, int64_t n, const Coef<T>& k,              \
                    bool stream) {                                                            \
    fq_backward_seg<T>(g, x, gx, n, k, stream);                                               \
  }                                                                                           \
  void lsq_run(const T* g, const T* x, T* gx, int64_t n, const Coef<T>& k, double& ds,       \
               double& dz, bool stream) {                                                     \
    lsq_backward_seg<T>(g, x, gx, n, k, ds, dz, stream);                                      \
  }
OMPQ_NATIVE(float)
OMPQ_NATIVE(double)
#undef OMPQ_NATIVE

bool use_stream(const Tensor& out_like) {
  return out_like.numel() * static_cast<int64_t>(out_like.element_size()) >= stream_threshold_bytes();
}

template <typename S>
using compute_t = std::conditional_t<std::is_same<S, double>::value, double, float>;

#define OMPQ_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

// ---------------------------------------------------------------------------------------------
// Ops.
// ---------------------------------------------------------------------------------------------

Tensor fake_quant_impl(const char* op, const Tensor& x_, const Tensor& scale,
                       const Tensor& zero_point, int64_t qmin, int64_t qmax,
                       c10::optional<int64_t> axis, bool round_zero_point) {
  const Layout l = check_and_layout(op, x_, scale, zero_point, qmin, qmax, axis);
  const Params p = read_params(op, scale, zero_point, qmin, qmax, round_zero_point);
  const Tensor x = x_.contiguous();
  Tensor y = at::empty_like(x);
  OMPQ_DISPATCH(x.scalar_type(), "ompq_fake_quant", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool stream = use_stream(x);
    for_each_run(l, [&](int64_t, int64_t b, int64_t len, int64_t c) {
      forward_run(xp + b, yp + b, len, coef<T>(p, c, qmin, qmax, 1.0), stream);
    });
  });
  return y;
}

Tensor fake_quant_cpu(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                      int64_t qmin, int64_t qmax, c10::optional<int64_t> axis) {
  return fake_quant_impl("fake_quant", x, scale, zero_point, qmin, qmax, axis, false);
}

Tensor lsq_fake_quant_cpu(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                          int64_t qmin, int64_t qmax, c10::optional<int64_t> axis,
                          double grad_factor) {
  (void)grad_factor;  // only used by the backward
  return fake_quant_impl("lsq_fake_quant", x, scale, zero_point, qmin, qmax, axis, true);
}

Tensor fake_quant_backward_cpu(const Tensor& grad_, const Tensor& x_, const Tensor& scale,
                               const Tensor& zero_point, int64_t qmin, int64_t qmax,
                               c10::optional<int64_t> axis) {
  const char* op = "fake_quant_backward";
  const Layout l = check_and_layout(op, x_, scale, zero_point, qmin, qmax, axis);
  check_grad(op, grad_, x_);
  const Params p = read_params(op, scale, zero_point, qmin, qmax, false);
  const Tensor x = x_.contiguous();
  const Tensor grad = grad_.contiguous();
  Tensor gx = at::empty_like(x);
  OMPQ_DISPATCH(x.scalar_type(), "ompq_fake_quant_backward", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op_ = gx.mutable_data_ptr<scalar_t>();
    const bool stream = use_stream(x);
    for_each_run(l, [&](int64_t, int64_t b, int64_t len, int64_t c) {
      backward_run(gp + b, xp + b, op_ + b, len, coef<T>(p, c, qmin, qmax, 1.0), stream);
    });
  });
  return gx;
}

std::tuple<Tensor, Tensor, Tensor> lsq_fake_quant_backward_cpu(
    const Tensor& grad_, const Tensor& x_, const Tensor& scale, const Tensor& zero_point,
    int64_t qmin, int64_t qmax, c10::optional<int64_t> axis, double grad_factor) {
  const char* op = "lsq_fake_quant_backward";
  const Layout l = check_and_layout(op, x_, scale, zero_point, qmin, qmax, axis);
  check_grad(op, grad_, x_);
  check_grad_factor(op, grad_factor);
  const Params p = read_params(op, scale, zero_point, qmin, qmax, true);
  const Tensor x = x_.contiguous();
  const Tensor grad = grad_.contiguous();
  Tensor gx = at::empty_like(x);
  const ChunkSlots slots(l);
  // Per-chunk partial sums (double), one slot per channel that the chunk touches, reduced in
  // chunk order below: deterministic for any thread count.
  std::vector<double> part_s(slots.total, 0.0), part_z(slots.total, 0.0);
  OMPQ_DISPATCH(x.scalar_type(), "ompq_lsq_fake_quant_backward", [&] {
    using T = compute_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* op_ = gx.mutable_data_ptr<scalar_t>();
    const bool stream = use_stream(x);
    for_each_run(l, [&](int64_t k, int64_t b, int64_t len, int64_t c) {
      double ds = 0.0, dz = 0.0;
      lsq_run(gp + b, xp + b, op_ + b, len, coef<T>(p, c, qmin, qmax, grad_factor), ds, dz,
              stream);
      const int64_t i = slots.index(k, b / l.inner);
      part_s[i] += ds;
      part_z[i] += dz;
    });
  });
  std::vector<double> sum_s(l.channels, 0.0), sum_z(l.channels, 0.0);
  for (int64_t k = 0; k < slots.chunks; ++k) {
    for (int64_t j = 0; j < slots.size(k); ++j) {
      const int64_t c = slots.channel(k, j);
      sum_s[c] += part_s[slots.offset[k] + j];
      sum_z[c] += part_z[slots.offset[k] + j];
    }
  }
  auto opts = at::TensorOptions().dtype(at::kDouble);
  // clone(): from_blob aliases the local vectors, and .to() is a no-op for double.
  Tensor gs = at::from_blob(sum_s.data(), {l.channels}, opts)
                  .clone()
                  .to(scale.scalar_type())
                  .reshape(scale.sizes());
  Tensor gz = at::from_blob(sum_z.data(), {l.channels}, opts).clone();
  gz = (at::isFloatingType(zero_point.scalar_type()) ? gz.to(zero_point.scalar_type())
                                                     : gz.to(at::kFloat))
           .reshape(zero_point.sizes());
  return std::make_tuple(gx, gs, gz);
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_FRAGMENT(ompq, m) {
  m.def("fake_quant(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, "
        "int? axis=None) -> Tensor");
  m.def("fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int qmin, "
        "int qmax, int? axis=None) -> Tensor");
  m.def("lsq_fake_quant(Tensor x, Tensor scale, Tensor zero_point, int qmin, int qmax, "
        "int? axis=None, float grad_factor=1.0) -> Tensor");
  m.def("lsq_fake_quant_backward(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, "
        "int qmin, int qmax, int? axis=None, float grad_factor=1.0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ompq, CPU, m) {
  m.impl("fake_quant", &ompq::fake_quant_cpu);
  m.impl("fake_quant_backward", &ompq::fake_quant_backward_cpu);
  m.impl("lsq_fake_quant", &ompq::lsq_fake_quant_cpu);
  m.impl("lsq_fake_quant_backward", &ompq::lsq_fake_quant_backward_cpu);
}
