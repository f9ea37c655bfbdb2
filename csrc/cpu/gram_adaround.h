// Input checks shared by the CPU and CUDA implementations of centered_gram and the AdaRound ops
// (defined in gram.cpp and adaround.cpp), so both devices give the same error messages.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace ompq {

// Checks x (≥ 2-D, ≥ 2 rows, fp32/fp16/bf16) and returns it as an N×D matrix with unit column
// stride (a view when possible). Throws ValueError / TypeError with a readable message.
at::Tensor gram_prepare_input(const at::Tensor& x);
// Throws ValueError when the N×N Gram holds NaN/Inf (non-finite input or fp32 overflow).
void gram_check_finite(const at::Tensor& gram);

struct AdaLayout {
  int64_t channels = 1;  // length of scale / zero_point
  int64_t inner = 1;     // contiguous elements sharing one channel
};
// Validates the AdaRound quantizer arguments (normalises a negative axis) and returns the layout.
// check_values = false skips the value check of scale (a device-to-host sync on CUDA): the CUDA
// backward op trusts the scale its forward checked.
AdaLayout adaround_check_args(const char* op, const at::Tensor& w, const at::Tensor& scale,
                              const at::Tensor& zero_point, const at::Tensor& v, int64_t qmin,
                              int64_t qmax, std::optional<int64_t>& axis,
                              bool check_values = true);
// grad of adaround_fake_quant_backward: the shape and device of w (its dtype is converted).
void adaround_check_grad(const char* op, const at::Tensor& grad, const at::Tensor& w);
void adaround_check_reg_args(const char* op, const at::Tensor& v, double beta);

}  // namespace ompq
