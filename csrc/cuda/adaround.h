// Raw CUDA launchers for the AdaRound ops (CUDA runtime only; torch glue: adaround_glue.cpp).
// Semantics: see csrc/cpu/adaround.cpp and ompq/reference.py. All tensors contiguous; scale and
// zero_point hold `channels` values, element i uses channel (i / inner) % channels.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace ompq {
namespace cuda {

struct QuantLayout {
  int64_t numel;
  int64_t channels;
  int64_t inner;
  int64_t qmin;
  int64_t qmax;
};

// y = (clamp(floor(w/s) + h(v) + z, qmin, qmax) − z)·s, h soft (rectified sigmoid) or v >= 0.
cudaError_t adaround_forward(const float* w, const float* v, const float* scale, const float* zp,
                             float* out, QuantLayout lay, bool soft, cudaStream_t stream);
cudaError_t adaround_forward(const double* w, const double* v, const double* scale,
                             const double* zp, double* out, QuantLayout lay, bool soft,
                             cudaStream_t stream);

// gw = grad·[inside] (straight-through), gv = gw·s·h'(v) (soft) or 0 (hard).
cudaError_t adaround_backward(const float* grad, const float* w, const float* v,
                              const float* scale, const float* zp, float* gw, float* gv,
                              QuantLayout lay, bool soft, cudaStream_t stream);
cudaError_t adaround_backward(const double* grad, const double* w, const double* v,
                              const double* scale, const double* zp, double* gw, double* gv,
                              QuantLayout lay, bool soft, cudaStream_t stream);

// Number of fp64 partial sums adaround_reg needs as `partials` workspace.
int adaround_reg_partials(int64_t numel);
// out[0] = Σ 1 − |2h(v) − 1|^β (deterministic two-pass reduction in fp64).
cudaError_t adaround_reg(const float* v, int64_t numel, double beta, double* partials, float* out,
                         cudaStream_t stream);
cudaError_t adaround_reg(const double* v, int64_t numel, double beta, double* partials,
                         double* out, cudaStream_t stream);

// gv = −grad[0]·β|u|^(β−1)·sign(u)·2h'(v), u = 2h(v) − 1 (grad: a device scalar).
cudaError_t adaround_reg_backward(const float* grad, const float* v, int64_t numel, double beta,
                                  float* gv, cudaStream_t stream);
cudaError_t adaround_reg_backward(const double* grad, const double* v, int64_t numel, double beta,
                                  double* gv, cudaStream_t stream);

}  // namespace cuda
}  // namespace ompq
