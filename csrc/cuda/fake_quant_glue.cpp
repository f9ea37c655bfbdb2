// Torch glue for the CUDA fake-quant kernels (built only with a CUDA torch).
//
// Shapes and dtypes are checked here with the same messages as the CPU ops. Value checks on
// scale/zero_point (positive, finite, in range) would need a device-to-host sync per call and
// are not done on CUDA. Non-float32 inputs are computed in float32 and cast back.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "fake_quant.h"

namespace ompq {
namespace {

using at::Tensor;

cuda::FqShape layout(const char* op, const Tensor& x, const Tensor& scale, const Tensor& zp,
                     int64_t qmin, int64_t qmax, c10::optional<int64_t> axis) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()),
              "ompq.", op, ": x must be a floating-point tensor (float32, float64, float16 or "
              "bfloat16), got ", x.scalar_type());
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()),
              "ompq.", op, ": scale must be a floating-point tensor, got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == x.device() && zp.device() == x.device(),
              "ompq.", op, ": scale (", scale.device(), ") and zero_point (", zp.device(),
              ") must be on the same device as x (", x.device(), ")");
  TORCH_CHECK(qmin < qmax, "ompq.", op, ": qmin (", qmin, ") must be smaller than qmax (", qmax,
              ")");
  TORCH_CHECK(qmax - qmin <= 65535 && qmin >= -65536 && qmax <= 65535,
              "ompq.", op, ": [qmin, qmax] = [", qmin, ", ", qmax,
              "] is not a range of at most 16 bits");
  cuda::FqShape s{1, 1, x.numel()};
  if (!axis.has_value()) {
    TORCH_CHECK(scale.numel() == 1 && zp.numel() == 1,
                "ompq.", op, ": per-tensor quantization (axis=None) needs 1-element scale and "
                "zero_point, got scale with ", scale.numel(), " and zero_point with ", zp.numel(),
                " elements (pass axis=... for per-channel)");
    return s;
  }
  const int64_t dim = x.dim(), a = *axis;
  TORCH_CHECK(dim > 0 && a >= -dim && a < dim, "ompq.", op, ": axis ", a,
              " is out of range for x with ", dim, " dimensions");
  const int64_t ax = a < 0 ? a + dim : a;
  s.channels = x.size(ax);
  s.inner = 1;
  for (int64_t d = 0; d < ax; ++d) s.outer *= x.size(d);
  for (int64_t d = ax + 1; d < dim; ++d) s.inner *= x.size(d);
  TORCH_CHECK(scale.numel() == s.channels, "ompq.", op, ": scale has ", scale.numel(),
              " elements but x.size(", ax, ") = ", s.channels, " channels");
  TORCH_CHECK(zp.numel() == s.channels, "ompq.", op, ": zero_point has ", zp.numel(),
              " elements but x.size(", ax, ") = ", s.channels, " channels");
  return s;
}

struct DevParams {
  Tensor scale, inv, zp;
};

DevParams params(const Tensor& scale, const Tensor& zero_point, int64_t qmin, int64_t qmax,
                 bool round_zp) {
  DevParams p;
  p.scale = scale.detach().to(at::kFloat).contiguous().reshape({-1});
  p.inv = at::reciprocal(p.scale);  // 1.0f / scale in float32, like the CPU kernels
  Tensor z = zero_point.detach().to(at::kFloat).contiguous().reshape({-1});
  p.zp = round_zp ? at::clamp(at::round(z), static_cast<double>(qmin), static_cast<double>(qmax))
                  : z;
  return p;
}

void check(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "ompq.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(e));
}

Tensor forward_cuda(const char* op, const Tensor& x_, const Tensor& scale,
                    const Tensor& zero_point, int64_t qmin, int64_t qmax,
                    c10::optional<int64_t> axis, bool round_zp) {
  const auto shape = layout(op, x_, scale, zero_point, qmin, qmax, axis);
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.to(at::kFloat).contiguous();
  const DevParams p = params(scale, zero_point, qmin, qmax, round_zp);
  Tensor y = at::empty_like(x);
  check(cuda::fake_quant_forward(x.const_data_ptr<float>(), y.mutable_data_ptr<float>(),
                                 p.scale.const_data_ptr<float>(), p.inv.const_data_ptr<float>(),
                                 p.zp.const_data_ptr<float>(), shape, static_cast<float>(qmin),
                                 static_cast<float>(qmax),
                                 c10::cuda::getCurrentCUDAStream().stream()),
        op);
  return y.to(x_.scalar_type());
}

Tensor fake_quant_cuda(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                       int64_t qmin, int64_t qmax, c10::optional<int64_t> axis) {
  return forward_cuda("fake_quant", x, scale, zero_point, qmin, qmax, axis, false);
}

Tensor lsq_fake_quant_cuda(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                           int64_t qmin, int64_t qmax, c10::optional<int64_t> axis,
                           double /*grad_factor*/) {
  return forward_cuda("lsq_fake_quant", x, scale, zero_point, qmin, qmax, axis, true);
}

Tensor fake_quant_backward_cuda(const Tensor& grad, const Tensor& x_, const Tensor& scale,
                                const Tensor& zero_point, int64_t qmin, int64_t qmax,
                                c10::optional<int64_t> axis) {
  const char* op = "fake_quant_backward";
  const auto shape = layout(op, x_, scale, zero_point, qmin, qmax, axis);
  TORCH_CHECK(grad.sizes() == x_.sizes(), "ompq.", op, ": grad has shape ", grad.sizes(),
              " but x has shape ", x_.sizes());
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.to(at::kFloat).contiguous();
  const Tensor g = grad.to(at::kFloat).contiguous();
  const DevParams p = params(scale, zero_point, qmin, qmax, false);
  Tensor gx = at::empty_like(x);
  check(cuda::fake_quant_backward(g.const_data_ptr<float>(), x.const_data_ptr<float>(),
                                  gx.mutable_data_ptr<float>(), p.inv.const_data_ptr<float>(),
                                  p.zp.const_data_ptr<float>(), shape, static_cast<float>(qmin),
                                  static_cast<float>(qmax),
                                  c10::cuda::getCurrentCUDAStream().stream()),
        op);
  return gx.to(x_.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> lsq_fake_quant_backward_cuda(
    const Tensor& grad, const Tensor& x_, const Tensor& scale, const Tensor& zero_point,
    int64_t qmin, int64_t qmax, c10::optional<int64_t> axis, double grad_factor) {
  const char* op = "lsq_fake_quant_backward";
  const auto shape = layout(op, x_, scale, zero_point, qmin, qmax, axis);
  TORCH_CHECK(grad.sizes() == x_.sizes(), "ompq.", op, ": grad has shape ", grad.sizes(),
              " but x has shape ", x_.sizes());
  c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.to(at::kFloat).contiguous();
  const Tensor g = grad.to(at::kFloat).contiguous();
  const DevParams p = params(scale, zero_point, qmin, qmax, true);
  Tensor gx = at::empty_like(x);
  Tensor acc = at::zeros({2, shape.channels}, x.options().dtype(at::kDouble));
  check(cuda::lsq_backward(g.const_data_ptr<float>(), x.const_data_ptr<float>(),
                           gx.mutable_data_ptr<float>(), p.scale.const_data_ptr<float>(),
                           p.inv.const_data_ptr<float>(), p.zp.const_data_ptr<float>(), shape,
                           static_cast<float>(qmin), static_cast<float>(qmax),
                           static_cast<float>(grad_factor), acc.mutable_data_ptr<double>(),
                           acc.mutable_data_ptr<double>() + shape.channels,
                           c10::cuda::getCurrentCUDAStream().stream()),
        op);
  const auto zdt = at::isFloatingType(zero_point.scalar_type()) ? zero_point.scalar_type()
                                                                : at::kFloat;
  return std::make_tuple(gx.to(x_.scalar_type()),
                         acc[0].to(scale.scalar_type()).reshape(scale.sizes()),
                         acc[1].to(zdt).reshape(zero_point.sizes()));
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_IMPL(ompq, CUDA, m) {
  m.impl("fake_quant", &ompq::fake_quant_cuda);
  m.impl("fake_quant_backward", &ompq::fake_quant_backward_cuda);
  m.impl("lsq_fake_quant", &ompq::lsq_fake_quant_cuda);
  m.impl("lsq_fake_quant_backward", &ompq::lsq_fake_quant_backward_cuda);
}
