// Argument checks of fake_quant / lsq_fake_quant, shared by the CPU kernels
// (csrc/cpu/fake_quant.cpp) and the CUDA glue (csrc/cuda/fake_quant_glue.cpp), so both devices
// accept the same arguments and raise the same messages.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

namespace ompq {
namespace fq_checks {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Argument checks (shared with the CUDA glue through the same messages).
// ---------------------------------------------------------------------------------------------

struct Layout {
  int64_t outer = 1;
  int64_t channels = 1;
  int64_t inner = 1;
  int64_t numel = 0;
};

inline Layout check_and_layout(const char* op, const Tensor& x, const Tensor& scale,
                        const Tensor& zero_point, int64_t qmin, int64_t qmax,
                        c10::optional<int64_t> axis) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "ompq.", op, ": x must be a floating-point tensor (float32, float64, float16 or "
              "bfloat16), got ", dt);
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()),
              "ompq.", op, ": scale must be a floating-point tensor, got ", scale.scalar_type());
  TORCH_CHECK(at::isFloatingType(zero_point.scalar_type()) ||
                  at::isIntegralType(zero_point.scalar_type(), /*includeBool=*/false),
              "ompq.", op, ": zero_point must be a float or integer tensor, got ",
              zero_point.scalar_type());
  TORCH_CHECK(scale.device() == x.device() && zero_point.device() == x.device(),
              "ompq.", op, ": scale (", scale.device(), ") and zero_point (",
              zero_point.device(), ") must be on the same device as x (", x.device(), ")");
  TORCH_CHECK(qmin < qmax, "ompq.", op, ": qmin (", qmin, ") must be smaller than qmax (", qmax,
              ")");
  TORCH_CHECK(qmax - qmin <= 65535 && qmin >= -65536 && qmax <= 65535,
              "ompq.", op, ": [qmin, qmax] = [", qmin, ", ", qmax,
              "] is not a range of at most 16 bits (need qmax - qmin <= 65535 and "
              "-65536 <= qmin, qmax <= 65535)");
  Layout l;
  l.numel = x.numel();
  if (!axis.has_value()) {
    TORCH_CHECK(scale.numel() == 1 && zero_point.numel() == 1,
                "ompq.", op, ": per-tensor quantization (axis=None) needs 1-element scale and "
                "zero_point, got scale with ", scale.numel(), " and zero_point with ",
                zero_point.numel(), " elements (pass axis=... for per-channel)");
    l.inner = l.numel;
    return l;
  }
  const int64_t dim = x.dim();
  const int64_t a = *axis;
  TORCH_CHECK(dim > 0 && a >= -dim && a < dim,
              "ompq.", op, ": axis ", a, " is out of range for x with ", dim,
              " dimensions (valid: ", (dim > 0 ? -dim : 0), "..", (dim > 0 ? dim - 1 : -1),
              ", or None for per-tensor)");
  const int64_t ax = a < 0 ? a + dim : a;
  l.channels = x.size(ax);
  for (int64_t d = 0; d < ax; ++d) l.outer *= x.size(d);
  for (int64_t d = ax + 1; d < dim; ++d) l.inner *= x.size(d);
  TORCH_CHECK(scale.numel() == l.channels,
              "ompq.", op, ": scale has ", scale.numel(), " elements but x.size(", ax, ") = ",
              l.channels, " channels (per-channel quantization needs one scale per channel)");
  TORCH_CHECK(zero_point.numel() == l.channels,
              "ompq.", op, ": zero_point has ", zero_point.numel(), " elements but x.size(", ax,
              ") = ", l.channels, " channels (one zero point per channel)");
  return l;
}

inline std::string channel_name(int64_t c, int64_t channels) {
  if (channels == 1) return "";
  std::ostringstream os;
  os << " of channel " << c;
  return os.str();
}

// Per-channel parameters as float32: scale, 1/scale and the (possibly rounded) zero point.
struct Params {
  std::vector<float> scale, inv, zp;
};

inline Params read_params(const char* op, const Tensor& scale, const Tensor& zero_point, int64_t qmin,
                   int64_t qmax, bool round_zero_point) {
  const Tensor s = scale.detach().to(at::kCPU, at::kFloat).contiguous().reshape({-1});
  const Tensor z = zero_point.detach().to(at::kCPU, at::kFloat).contiguous().reshape({-1});
  const int64_t n = s.numel();
  Params p;
  p.scale.resize(n);
  p.inv.resize(n);
  p.zp.resize(n);
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  for (int64_t c = 0; c < n; ++c) {
    const float sc = sp[c];
    TORCH_CHECK(std::isfinite(sc) && sc > 0.0f,
                "ompq.", op, ": scale must be positive and finite, got ", sc,
                channel_name(c, n));
    const float inv = 1.0f / sc;
    TORCH_CHECK(std::isfinite(inv),
                "ompq.", op, ": scale ", sc, channel_name(c, n),
                " is too small (its inverse overflows float32; use a scale >= ",
                1.0f / std::numeric_limits<float>::max(), ")");
    float zv = zp[c];
    TORCH_CHECK(std::isfinite(zv), "ompq.", op, ": zero_point must be finite, got ", zv,
                channel_name(c, n));
    if (round_zero_point) {
      zv = std::min(std::max(std::nearbyint(zv), static_cast<float>(qmin)),
                    static_cast<float>(qmax));
    } else {
      TORCH_CHECK(zv >= static_cast<float>(qmin) && zv <= static_cast<float>(qmax),
                  "ompq.", op, ": zero_point ", zv, channel_name(c, n), " is outside [qmin, qmax] = [",
                  qmin, ", ", qmax, "]");
    }
    p.scale[c] = sc;
    p.inv[c] = inv;
    p.zp[c] = zv;
  }
  return p;
}


// The LSQ backward's gradient scale factor (any finite value; NaN and +-Inf are rejected).
inline void check_grad_factor(const char* op, double grad_factor) {
  TORCH_CHECK(std::isfinite(grad_factor), "ompq.", op, ": grad_factor must be finite, got ",
              grad_factor);
}

inline void check_grad(const char* op, const Tensor& grad, const Tensor& x) {
  TORCH_CHECK(grad.sizes() == x.sizes(), "ompq.", op, ": grad has shape ", grad.sizes(),
              " but x has shape ", x.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "ompq.", op, ": grad dtype ",
              grad.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), "ompq.", op, ": grad is on ", grad.device(),
              " but x is on ", x.device());
}

}  // namespace fq_checks
}  // namespace ompq
