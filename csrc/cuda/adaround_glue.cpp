// Torch glue for the CUDA AdaRound kernels (built only against a CUDA torch). The forward checks
// scale's values (one sync); the backward ops never sync (they trust the forward's check).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../cpu/gram_adaround.h"
#include "adaround.h"

namespace ompq {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// The tensor the device guard is built from must be a CUDA tensor. Called after the shared
// checks (which put scale / zero point / v / grad on w's device), before any guard: a CPU w or v
// with a CUDA grad reaches the CUDA kernel and gets a readable message instead of the guard's.
void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " is on ", t.device(),
                    " but the other tensors are on a CUDA device; put all of them on one device");
}

cuda::QuantLayout quant_layout(const at::Tensor& w, const AdaLayout& lay, int64_t qmin,
                               int64_t qmax) {
  return cuda::QuantLayout{w.numel(), lay.channels, lay.inner, qmin, qmax};
}

at::Tensor adaround_fake_quant_cuda(const at::Tensor& w, const at::Tensor& scale,
                                    const at::Tensor& zero_point, const at::Tensor& v,
                                    int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                                    bool soft) {
  const AdaLayout lay =
      adaround_check_args("adaround_fake_quant", w, scale, zero_point, v, qmin, qmax, axis);
  check_cuda("adaround_fake_quant", "w", w);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor wc = w.contiguous(), vc = v.contiguous();
  const at::Tensor s = scale.to(w.scalar_type()).contiguous();
  const at::Tensor z = zero_point.to(w.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(wc);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "adaround_fake_quant_cuda", [&] {
    check_launch(cuda::adaround_forward(wc.const_data_ptr<scalar_t>(),
                                        vc.const_data_ptr<scalar_t>(),
                                        s.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                                        out.mutable_data_ptr<scalar_t>(),
                                        quant_layout(wc, lay, qmin, qmax), soft,
                                        c10::cuda::getCurrentCUDAStream().stream()),
                 "adaround_fake_quant");
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> adaround_fake_quant_backward_cuda(
    const at::Tensor& grad, const at::Tensor& w, const at::Tensor& scale,
    const at::Tensor& zero_point, const at::Tensor& v, int64_t qmin, int64_t qmax,
    std::optional<int64_t> axis, bool soft) {
  const AdaLayout lay = adaround_check_args("adaround_fake_quant_backward", w, scale, zero_point,
                                            v, qmin, qmax, axis, /*check_values=*/false);
  adaround_check_grad("adaround_fake_quant_backward", grad, w);
  check_cuda("adaround_fake_quant_backward", "w", w);
  const c10::cuda::CUDAGuard guard(w.device());
  const at::Tensor gc = grad.to(w.scalar_type()).contiguous();
  const at::Tensor wc = w.contiguous(), vc = v.contiguous();
  const at::Tensor s = scale.to(w.scalar_type()).contiguous();
  const at::Tensor z = zero_point.to(w.scalar_type()).contiguous();
  at::Tensor gw = at::empty_like(wc), gv = at::empty_like(vc);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "adaround_fake_quant_backward_cuda", [&] {
    check_launch(cuda::adaround_backward(gc.const_data_ptr<scalar_t>(),
                                         wc.const_data_ptr<scalar_t>(),
                                         vc.const_data_ptr<scalar_t>(),
                                         s.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                                         gw.mutable_data_ptr<scalar_t>(),
                                         gv.mutable_data_ptr<scalar_t>(),
                                         quant_layout(wc, lay, qmin, qmax), soft,
                                         c10::cuda::getCurrentCUDAStream().stream()),
                 "adaround_fake_quant_backward");
  });
  return {gw, gv};
}

at::Tensor adaround_reg_cuda(const at::Tensor& v, double beta) {
  adaround_check_reg_args("adaround_reg", v, beta);
  check_cuda("adaround_reg", "v", v);
  const c10::cuda::CUDAGuard guard(v.device());
  const at::Tensor vc = v.contiguous();
  at::Tensor out = at::empty({}, v.options());
  at::Tensor partials =
      at::empty({cuda::adaround_reg_partials(vc.numel())}, v.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "adaround_reg_cuda", [&] {
    check_launch(cuda::adaround_reg(vc.const_data_ptr<scalar_t>(), vc.numel(), beta,
                                    partials.mutable_data_ptr<double>(),
                                    out.mutable_data_ptr<scalar_t>(),
                                    c10::cuda::getCurrentCUDAStream().stream()),
                 "adaround_reg");
  });
  return out;
}

at::Tensor adaround_reg_backward_cuda(const at::Tensor& grad, const at::Tensor& v, double beta) {
  adaround_check_reg_args("adaround_reg_backward", v, beta);
  TORCH_CHECK_VALUE(grad.numel() == 1, "adaround_reg_backward: grad must be a scalar, got shape ",
                    grad.sizes());
  TORCH_CHECK_VALUE(grad.device() == v.device(), "adaround_reg_backward: grad is on ",
                    grad.device(), " but v is on ", v.device());
  check_cuda("adaround_reg_backward", "v", v);
  const c10::cuda::CUDAGuard guard(v.device());
  const at::Tensor vc = v.contiguous();
  const at::Tensor gc = grad.to(v.options()).reshape({1}).contiguous();
  at::Tensor gv = at::empty_like(vc);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "adaround_reg_backward_cuda", [&] {
    check_launch(cuda::adaround_reg_backward(gc.const_data_ptr<scalar_t>(),
                                             vc.const_data_ptr<scalar_t>(), vc.numel(), beta,
                                             gv.mutable_data_ptr<scalar_t>(),
                                             c10::cuda::getCurrentCUDAStream().stream()),
                 "adaround_reg_backward");
  });
  return gv;
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_IMPL(ompq, CUDA, m) {
  m.impl("adaround_fake_quant", &ompq::adaround_fake_quant_cuda);
  m.impl("adaround_fake_quant_backward", &ompq::adaround_fake_quant_backward_cuda);
  m.impl("adaround_reg", &ompq::adaround_reg_cuda);
  m.impl("adaround_reg_backward", &ompq::adaround_reg_backward_cuda);
}
