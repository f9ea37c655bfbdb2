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
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor out = at::zeros({n, n}, x.options().dtype(at::kFloat));
  if (d == 0) return out;
  at::Tensor mean = at::empty({d}, x.options().dtype(at::kFloat));
  cuda::GramDType dt = cuda::GramDType::kFloat32;
  if (x.scalar_type() == at::kHalf) dt = cuda::GramDType::kFloat16;
  if (x.scalar_type() == at::kBFloat16) dt = cuda::GramDType::kBFloat16;
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error; the launcher falls back to a default
    sms = 0;
  }
  const cudaError_t err =
      cuda::centered_gram(x.const_data_ptr(), dt, n, d, x.stride(0), mean.mutable_data_ptr<float>(),
                          out.mutable_data_ptr<float>(), sms, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "centered_gram: CUDA launch failed: ", cudaGetErrorString(err));
  gram_check_finite(out);
  return out;
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_IMPL(ompq, CUDA, m) {
  m.impl("centered_gram", &ompq::centered_gram_cuda);
}
