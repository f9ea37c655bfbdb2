// Raw CUDA launchers for centered_gram (CUDA runtime only; the torch glue is gram_glue.cpp).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace ompq {
namespace cuda {

enum class GramDType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Number of fp64 partial sums (workspace) centered_gram needs for an n×d input.
int64_t gram_partial_count(int64_t n, int64_t d);

// N×N fp32 Gram of the column-centred N×D matrix x (row stride ld elements, unit column stride).
// `mean` is device scratch of d floats (column means accumulated in fp64), `partial` device
// scratch of gram_partial_count(n, d) doubles. Upper-triangle tile pairs × column slices
// (kernel_plan.h): fp32 FMAs flushed into fp64 every 256 columns, one fp64 partial tile per
// (pair, slice) written with plain stores, then a finalise that adds the slices of each entry in
// slice order and writes both halves of `out` (n·n floats, no zero-fill needed). No atomics:
// bitwise reproducible. Returns the launch status.
cudaError_t centered_gram(const void* x, GramDType dtype, int64_t n, int64_t d, int64_t ld,
                          float* mean, double* partial, float* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace ompq
