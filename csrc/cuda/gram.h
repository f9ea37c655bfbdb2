// Raw CUDA launchers for centered_gram (CUDA runtime only; the torch glue is gram_glue.cpp).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace ompq {
namespace cuda {

enum class GramDType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// N×N fp32 Gram of the column-centred N×D matrix x (row stride ld elements, unit column stride).
// `mean` is device scratch of d floats; `out` (n·n floats) must be zero-filled on `stream` before
// the call. Accumulates in fp32 per thread, split over D with fp32 atomics; the column means are
// accumulated in fp64. Returns the launch status.
cudaError_t centered_gram(const void* x, GramDType dtype, int64_t n, int64_t d, int64_t ld,
                          float* mean, float* out, int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace ompq
