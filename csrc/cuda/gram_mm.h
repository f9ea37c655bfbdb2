// centered_gram through the vendor GEMM (at::bmm / at::mm: cuBLAS on CUDA, MKL/oneDNN on CPU).
// Defined in csrc/cpu/gram_mm.cpp (device-generic ATen, built into every configuration); declared
// here so the CUDA glue (gram_glue.cpp) can route `centered_gram` to it. ATen only, no CUDA.
#pragma once
#include <ATen/ATen.h>

namespace ompq {

// The N×N fp32 Gram of the column-centred N×D x (fp32/fp16/bf16, any device ATen's GEMM runs
// on), with the input checks and error messages of centered_gram (gram_prepare_input,
// gram_check_finite). Design and accuracy: the header comment of csrc/cpu/gram_mm.cpp.
at::Tensor centered_gram_mm_impl(const at::Tensor& x);

// True when fp32 GEMMs on x's device would not be IEEE fp32 even under at::NoTF32Guard (a global
// bf16/tf32 matmul precision for oneDNN on CPU, bf16 for cuBLAS): centered_gram_mm_impl then
// computes its fp32 products in fp64.
bool gram_mm_needs_fp64(const at::Tensor& x);

}  // namespace ompq
