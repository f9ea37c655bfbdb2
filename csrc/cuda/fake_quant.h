// Raw CUDA launchers for fake_quant / lsq_fake_quant (float32). Plain C++ interface: device
// pointers, sizes and a stream; no torch types, so fake_quant.cu needs only cuda_runtime.h.
//
// x is viewed as [outer, channels, inner] (channels = 1 for per-tensor). scale, inv (= 1/scale,
// computed in float32) and zp (zero point as float; already rounded/clamped for LSQ) hold one
// value per channel. Semantics: see csrc/cpu/fake_quant.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ompq {
namespace cuda {

struct FqShape {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

// y = (clamp(rint(x * inv) + zp, qmin, qmax) - zp) * scale  (NaN -> qmin).
cudaError_t fake_quant_forward(const float* x, float* y, const float* scale, const float* inv,
                               const float* zp, FqShape shape, float qmin, float qmax,
                               cudaStream_t stream);

// gx = g * (qmin <= rint(x * inv) + zp <= qmax).
cudaError_t fake_quant_backward(const float* g, const float* x, float* gx, const float* inv,
                                const float* zp, FqShape shape, float qmin, float qmax,
                                cudaStream_t stream);

// LSQ backward: writes gx and ADDS the per-channel sums of the scale / zero-point gradients
// into acc_scale[channels] and acc_zp[channels] (double; the caller zeroes them).
cudaError_t lsq_backward(const float* g, const float* x, float* gx, const float* scale,
                         const float* inv, const float* zp, FqShape shape, float qmin,
                         float qmax, float grad_factor, double* acc_scale, double* acc_zp,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace ompq
