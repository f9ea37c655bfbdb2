// Torch glue for the CUDA centered_gram kernel (built only against a CUDA torch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../cpu/gram_adaround.h"
#include "gram.h"

namespace ompq {
namespace {

at::Tensor centered_gram_cuda(const at::Tensor& x_in) {
  const at::Tensor x = gram_prepare_input(x_in);
  TORCH_CHECK_VALUE(x.is_cuda(), "centered_gram: x is on ", x.device(),
                    " but the CUDA kernel was called; expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1);
  if (d == 0) return at::zeros({n, n}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({n, n}, x.options().dtype(at::kFloat));  // the finalise writes all
  at::Tensor mean = at::empty({d}, x.options().dtype(at::kFloat));
  at::Tensor partial =
      at::empty({cuda::gram_partial_count(n, d)}, x.options().dtype(at::kDouble));
  cuda::GramDType dt = cuda::GramDType::kFloat32;
  if (x.scalar_type() == at::kHalf) dt = cuda::GramDType::kFloat16;
  if (x.scalar_type() == at::kBFloat16) dt = cuda::GramDType::kBFloat16;
  const cudaError_t err = cuda::centered_gram(
      x.const_data_ptr(), dt, n, d, x.stride(0), mean.mutable_data_ptr<float>(),
      partial.mutable_data_ptr<double>(), out.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "centered_gram: CUDA launch failed: ", cudaGetErrorString(err));
  gram_check_finite(out);
  return out;
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_IMPL(ompq, CUDA, m) {
  m.impl("centered_gram", &ompq::centered_gram_cuda);
}
