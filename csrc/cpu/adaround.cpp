// AdaRound ops (CPU): adaround_fake_quant (+ fused backward) and adaround_reg (+ backward).
//
//   h(v)  = clamp(sigmoid(v)·(ζ − γ) + γ, 0, 1)  (soft, ζ = 1.1, γ = −0.1)  or  (v >= 0)  (hard)
//   t     = floor(w / s) + h(v) + z,   y = (clamp(t, qmin, qmax) − z) · s
//   dy/dw = 1 inside [qmin, qmax] (straight-through), 0 outside
//   dy/dv = s · [qmin <= t <= qmax] · h'(v)   (soft; 0 when hard)
//   reg   = Σ 1 − |2h(v) − 1|^β
// Semantics follow ompq/reference.py. Vectorised with at::vec, parallel with at::parallel_for.

#include "vec_capability.h"  // first: picks the at::vec implementation

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "gram_adaround.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace ompq {

// Validate the quantizer arguments and return the channel layout of w.
AdaLayout adaround_check_args(const char* op, const at::Tensor& w, const at::Tensor& scale,
                        const at::Tensor& zero_point, const at::Tensor& v, int64_t qmin,
                        int64_t qmax, std::optional<int64_t>& axis, bool check_values) {
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble, op,
              ": w must be float32 or float64, got ", w.scalar_type());
  TORCH_CHECK_VALUE(v.sizes() == w.sizes(), op, ": v must have the same shape as w ", w.sizes(),
              ", got ", v.sizes());
  TORCH_CHECK_TYPE(v.scalar_type() == w.scalar_type(), op, ": v must have the dtype of w (",
              w.scalar_type(), "), got ", v.scalar_type());
  TORCH_CHECK_VALUE(qmin < qmax, op, ": qmin (", qmin, ") must be smaller than qmax (", qmax, ")");
  TORCH_CHECK_VALUE(scale.device() == w.device() && zero_point.device() == w.device(), op,
              ": scale and zero_point must be on the device of w (", w.device(), ")");
  TORCH_CHECK_VALUE(v.device() == w.device(), op, ": v is on ", v.device(), " but w is on ",
              w.device());
  AdaLayout lay;
  if (axis.has_value()) {
    const int64_t dim = w.dim();
    TORCH_CHECK_VALUE(dim > 0 && *axis >= -dim && *axis < dim, op, ": axis ", *axis,
                " is out of range for a ", dim, "-D tensor (valid: ", -dim, " .. ", dim - 1, ")");
    if (*axis < 0) *axis += dim;
    lay.channels = w.size(*axis);
    for (int64_t d = *axis + 1; d < dim; ++d) lay.inner *= w.size(d);
  } else {
    lay.inner = std::max<int64_t>(1, w.numel());  // one segment: a single scale for everything
  }
  const char* what = axis.has_value() ? "w.size(axis) for per-channel quantization"
                                      : "1 for per-tensor quantization (axis=None)";
  TORCH_CHECK_VALUE(scale.numel() == lay.channels, op, ": scale has ", scale.numel(),
              " elements; expected ", lay.channels, " (", what, ")");
  TORCH_CHECK_VALUE(zero_point.numel() == lay.channels, op, ": zero_point has ", zero_point.numel(),
              " elements; expected ", lay.channels, " (", what, ")");
  TORCH_CHECK_TYPE(scale.is_floating_point() && zero_point.is_floating_point(), op,
              ": scale and zero_point must be floating-point tensors (zero_point holds integers)");
  if (!check_values) return lay;
  // One fused reduction, one device-to-host sync (min/max only on the error path).
  TORCH_CHECK_VALUE((at::isfinite(scale) & (scale > 0)).all().item<bool>(), op,
              ": scale must be positive and finite, got min ", scale.min().item<double>(),
              " and max ", scale.max().item<double>());
  return lay;
}

void adaround_check_grad(const char* op, const at::Tensor& grad, const at::Tensor& w) {
  TORCH_CHECK_VALUE(grad.sizes() == w.sizes(), op, ": grad has shape ", grad.sizes(),
              ", expected the shape of w ", w.sizes());
  TORCH_CHECK_VALUE(grad.device() == w.device(), op, ": grad is on ", grad.device(),
              " but w is on ", w.device());
}

void adaround_check_reg_args(const char* op, const at::Tensor& v, double beta) {
  TORCH_CHECK_TYPE(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble, op,
              ": v must be float32 or float64, got ", v.scalar_type());
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta > 0, op, ": beta must be positive and finite, got ",
              beta);
}

namespace {

constexpr double kZeta = 1.1;
constexpr double kGamma = -0.1;
constexpr int64_t kGrain = 16384;

// Calls f(offset, count, s, z) on vector-sized pieces of [0, numel) in parallel, where s and z
// hold the scale and zero point of each element of the piece.
template <typename scalar_t, typename F>
void for_each_piece(int64_t numel, const AdaLayout& lay, const scalar_t* scale, const scalar_t* zp,
                    const F& f) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kV = Vec::size();
  at::parallel_for(0, numel, kGrain, [&](int64_t begin, int64_t end) {
    int64_t idx = begin;
    if (lay.inner == 1 && lay.channels > 1) {  // channel is the last (contiguous) dimension
      while (idx < end) {
        const int64_t c = idx % lay.channels;
        const int64_t len = std::min(end - idx, lay.channels - c);
        for (int64_t off = 0; off < len; off += kV) {
          const int64_t cnt = std::min(kV, len - off);
          const Vec s = cnt == kV ? Vec::loadu(scale + c + off) : Vec::loadu(scale + c + off, cnt);
          const Vec z = cnt == kV ? Vec::loadu(zp + c + off) : Vec::loadu(zp + c + off, cnt);
          f(idx + off, cnt, s, z);
        }
        idx += len;
      }
      return;
    }
    while (idx < end) {
      const int64_t row = idx / lay.inner;
      const int64_t c = row % lay.channels;
      const int64_t seg_end = std::min(end, (row + 1) * lay.inner);
      const Vec s(scale[c]);
      const Vec z(zp[c]);
      while (idx < seg_end) {
        const int64_t cnt = std::min(kV, seg_end - idx);
        f(idx, cnt, s, z);
        idx += cnt;
      }
    }
  });
}

template <typename Vec>
inline Vec load_n(const typename Vec::value_type* p, int64_t cnt) {
  return cnt == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, cnt);
}
template <typename Vec>
inline void store_n(const Vec& x, typename Vec::value_type* p, int64_t cnt) {
  if (cnt == Vec::size()) x.store(p); else x.store(p, cnt);
}

template <typename Vec>
inline Vec sigmoid(const Vec& v) {
  const Vec one(1);
  return one / (one + v.neg().exp());
}

// Rectified sigmoid h(v) and, optionally, its derivative h'(v).
template <typename Vec>
inline Vec soft_h(const Vec& v, Vec* dh) {
  using T = typename Vec::value_type;
  const Vec sig = sigmoid(v);
  const Vec raw = sig * Vec(static_cast<T>(kZeta - kGamma)) + Vec(static_cast<T>(kGamma));
  const Vec zero(0), one(1);
  if (dh != nullptr) {
    const Vec in = raw.ge(zero) * raw.le(one);  // torch.clamp passes the gradient at the edges
    *dh = in * Vec(static_cast<T>(kZeta - kGamma)) * sig * (one - sig);
  }
  return at::vec::clamp(raw, zero, one);
}

template <typename scalar_t>
void adaround_forward_kernel(const at::Tensor& w, const at::Tensor& v, const at::Tensor& scale,
                             const at::Tensor& zp, int64_t qmin, int64_t qmax, const AdaLayout& lay,
                             bool soft, at::Tensor& out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const Vec lo(static_cast<scalar_t>(qmin)), hi(static_cast<scalar_t>(qmax));
  for_each_piece<scalar_t>(w.numel(), lay, scale.const_data_ptr<scalar_t>(),
                           zp.const_data_ptr<scalar_t>(),
                           [&](int64_t i, int64_t cnt, const Vec& s, const Vec& z) {
    const Vec wv = load_n<Vec>(wp + i, cnt);
    const Vec vv = load_n<Vec>(vp + i, cnt);
    const Vec h = soft ? soft_h<Vec>(vv, nullptr) : vv.ge(Vec(0));
    const Vec t = (wv / s).floor() + h + z;
    store_n((at::vec::clamp(t, lo, hi) - z) * s, op + i, cnt);
  });
}

template <typename scalar_t>
void adaround_backward_kernel(const at::Tensor& grad, const at::Tensor& w, const at::Tensor& v,
                              const at::Tensor& scale, const at::Tensor& zp, int64_t qmin,
                              int64_t qmax, const AdaLayout& lay, bool soft, at::Tensor& gw,
                              at::Tensor& gv) {
  using Vec = at::vec::Vectorized<scalar_t>;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
  scalar_t* gvp = gv.mutable_data_ptr<scalar_t>();
  const Vec lo(static_cast<scalar_t>(qmin)), hi(static_cast<scalar_t>(qmax));
  for_each_piece<scalar_t>(w.numel(), lay, scale.const_data_ptr<scalar_t>(),
                           zp.const_data_ptr<scalar_t>(),
                           [&](int64_t i, int64_t cnt, const Vec& s, const Vec& z) {
    const Vec g = load_n<Vec>(gp + i, cnt);
    const Vec wv = load_n<Vec>(wp + i, cnt);
    const Vec vv = load_n<Vec>(vp + i, cnt);
    Vec dh(0);
    const Vec h = soft ? soft_h<Vec>(vv, &dh) : vv.ge(Vec(0));
    const Vec t = (wv / s).floor() + h + z;
    const Vec gin = g * (t.ge(lo) * t.le(hi));
    store_n(gin, gwp + i, cnt);
    store_n(soft ? gin * s * dh : Vec(0), gvp + i, cnt);
  });
}

at::Tensor adaround_fake_quant_cpu(const at::Tensor& w, const at::Tensor& scale,
                                   const at::Tensor& zero_point, const at::Tensor& v, int64_t qmin,
                                   int64_t qmax, std::optional<int64_t> axis, bool soft) {
  const AdaLayout lay =
      adaround_check_args("adaround_fake_quant", w, scale, zero_point, v, qmin, qmax, axis);
  const at::Tensor wc = w.contiguous(), vc = v.contiguous();
  const at::Tensor s = scale.to(w.scalar_type()).contiguous();
  const at::Tensor z = zero_point.to(w.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(wc);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "adaround_fake_quant", [&] {
    adaround_forward_kernel<scalar_t>(wc, vc, s, z, qmin, qmax, lay, soft, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> adaround_fake_quant_backward_cpu(
    const at::Tensor& grad, const at::Tensor& w, const at::Tensor& scale,
    const at::Tensor& zero_point, const at::Tensor& v, int64_t qmin, int64_t qmax,
    std::optional<int64_t> axis, bool soft) {
  const AdaLayout lay = adaround_check_args("adaround_fake_quant_backward", w, scale, zero_point, v,
                                      qmin, qmax, axis);
  adaround_check_grad("adaround_fake_quant_backward", grad, w);
  const at::Tensor gc = grad.to(w.scalar_type()).contiguous();
  const at::Tensor wc = w.contiguous(), vc = v.contiguous();
  const at::Tensor s = scale.to(w.scalar_type()).contiguous();
  const at::Tensor z = zero_point.to(w.scalar_type()).contiguous();
  at::Tensor gw = at::empty_like(wc), gv = at::empty_like(vc);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "adaround_fake_quant_backward", [&] {
    adaround_backward_kernel<scalar_t>(gc, wc, vc, s, z, qmin, qmax, lay, soft, gw, gv);
  });
  return {gw, gv};
}

at::Tensor adaround_reg_cpu(const at::Tensor& v, double beta) {
  adaround_check_reg_args("adaround_reg", v, beta);
  const at::Tensor vc = v.contiguous();
  at::Tensor out = at::empty({}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "adaround_reg", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t kV = Vec::size();
    const scalar_t* vp = vc.const_data_ptr<scalar_t>();
    const Vec b(static_cast<scalar_t>(beta)), one(1), two(2);
    const double total = at::parallel_reduce(
        0, vc.numel(), kGrain, 0.0,
        [&](int64_t begin, int64_t end, double acc) {
          __at_align__ scalar_t buf[kV];
          for (int64_t i = begin; i < end; i += kV) {
            const int64_t cnt = std::min(kV, end - i);
            const Vec h = soft_h<Vec>(load_n<Vec>(vp + i, cnt), nullptr);
            const Vec r = one - (two * h - one).abs().pow(b);
            r.store(buf);
            double part = 0.0;
            for (int64_t k = 0; k < cnt; ++k) part += static_cast<double>(buf[k]);
            acc += part;
          }
          return acc;
        },
        [](double a, double c) { return a + c; });
    out.fill_(total);
  });
  return out;
}

at::Tensor adaround_reg_backward_cpu(const at::Tensor& grad, const at::Tensor& v, double beta) {
  adaround_check_reg_args("adaround_reg_backward", v, beta);
  TORCH_CHECK_VALUE(grad.numel() == 1, "adaround_reg_backward: grad must be a scalar, got shape ",
              grad.sizes());
  const at::Tensor vc = v.contiguous();
  at::Tensor gv = at::empty_like(vc);
  const double g = grad.item<double>();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "adaround_reg_backward", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    constexpr int64_t kV = Vec::size();
    const scalar_t* vp = vc.const_data_ptr<scalar_t>();
    scalar_t* gp = gv.mutable_data_ptr<scalar_t>();
    const Vec b(static_cast<scalar_t>(beta)), bm1(static_cast<scalar_t>(beta - 1));
    const Vec one(1), two(2), zero(0), gs(static_cast<scalar_t>(-2.0 * g));
    at::parallel_for(0, vc.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; i += kV) {
        const int64_t cnt = std::min(kV, end - i);
        Vec dh;
        const Vec h = soft_h<Vec>(load_n<Vec>(vp + i, cnt), &dh);
        const Vec u = two * h - one;
        const Vec sign = u.gt(zero) - u.lt(zero);
        // d/dv (1 − |u|^β) = −β |u|^(β−1) · sign(u) · 2 h'(v); zero where u == 0.
        const Vec d = gs * b * u.abs().pow(bm1) * sign * dh;
        store_n(Vec::blendv(d, zero, u == zero), gp + i, cnt);
      }
    });
  });
  return gv;
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_FRAGMENT(ompq, m) {
  m.def(
      "adaround_fake_quant(Tensor w, Tensor scale, Tensor zero_point, Tensor v, int qmin, "
      "int qmax, int? axis, bool soft) -> Tensor");
  m.def(
      "adaround_fake_quant_backward(Tensor grad, Tensor w, Tensor scale, Tensor zero_point, "
      "Tensor v, int qmin, int qmax, int? axis, bool soft) -> (Tensor, Tensor)");
  m.def("adaround_reg(Tensor v, float beta) -> Tensor");
  m.def("adaround_reg_backward(Tensor grad, Tensor v, float beta) -> Tensor");
}

TORCH_LIBRARY_IMPL(ompq, CPU, m) {
  m.impl("adaround_fake_quant", &ompq::adaround_fake_quant_cpu);
  m.impl("adaround_fake_quant_backward", &ompq::adaround_fake_quant_backward_cpu);
  m.impl("adaround_reg", &ompq::adaround_reg_cpu);
  m.impl("adaround_reg_backward", &ompq::adaround_reg_backward_cpu);
}
