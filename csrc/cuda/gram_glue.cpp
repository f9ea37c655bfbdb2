// Torch glue for the CUDA centered_gram kernel (built only against a CUDA torch), and the CUDA
// registration of centered_gram_mm (the device-generic GEMM path of csrc/cpu/gram_mm.cpp).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../cpu/gram_adaround.h"
#include "gram.h"
#include "gram_mm.h"

namespace ompq {
namespace {

// Which implementation `centered_gram` uses on CUDA: the tiled kernel (gram.cu) or the cuBLAS
// path (centered_gram_mm_impl: slice GEMMs plus the exact centring, docs/DESIGN.md).
//
// Policy — UNMEASURED: no GPU was available when it was written; benchmarks/bench_cuda.py times
// tiled vs mm vs a plain torch.mm and should be used to set these thresholds. The GEMM path for
// large problems, N ≥ kMmMinRows samples, D ≥ kMmMinCols features and N·N·D ≥ kMmMinWork: there
// cuBLAS's throughput should win (fp32 SGEMM measured 1/0.74 ≈ 1.35× the tiled kernel on an
// H100; fp16/bf16 inputs run on the tensor cores, which the tiled kernel never uses) over its
// fixed costs (about 15 small ATen launches and one sync, the full N×N product instead of the
// upper triangle, and for features whose mean is large against their spread a second, centred
// pass). The tiled kernel for smaller problems, and whenever fp32 products would have to run in
// fp64 (a reduced fp32 matmul precision that at::NoTF32Guard does not undo). The environment
// variable OMPQ_CUDA_GRAM=tiled|mm (read per call) forces one path, for benchmarks and tests.
constexpr int64_t kMmMinRows = 16;
constexpr int64_t kMmMinCols = 4096;
constexpr int64_t kMmMinWork = int64_t{1} << 28;  // N·N·D multiply-adds (~2.7e8)

bool gram_uses_mm(const at::Tensor& x) {
  const char* force = std::getenv("OMPQ_CUDA_GRAM");
  if (force != nullptr && std::strcmp(force, "tiled") == 0) return false;
  if (force != nullptr && std::strcmp(force, "mm") == 0) return true;
  const int64_t n = x.size(0), d = x.size(1);
  if (n < kMmMinRows || d < kMmMinCols || n * n * d < kMmMinWork) return false;
  return !gram_mm_needs_fp64(x);
}

at::Tensor centered_gram_cuda(const at::Tensor& x_in) {
  const at::Tensor x = gram_prepare_input(x_in);
  TORCH_CHECK_VALUE(x.is_cuda(), "centered_gram: x is on ", x.device(),
                    " but the CUDA kernel was called; expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d = x.size(1);
  if (d == 0) return at::zeros({n, n}, x.options().dtype(at::kFloat));
  if (gram_uses_mm(x)) return centered_gram_mm_impl(x);
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

at::Tensor centered_gram_mm_cuda(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "centered_gram: x is on ", x.device(),
                    " but the CUDA kernel was called; expected a CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  return centered_gram_mm_impl(x);
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_IMPL(ompq, CUDA, m) {
  m.impl("centered_gram", &ompq::centered_gram_cuda);
  m.impl("centered_gram_mm", &ompq::centered_gram_mm_cuda);
}
