// Raw CUDA launchers for fake_quant / lsq_fake_quant. Plain C++ interface: device pointers,
// sizes and a stream; no torch types, so fake_quant.cu needs only the CUDA runtime headers.
//
// x is viewed as [outer, channels, inner] (channels = 1 for per-tensor) and read in its native
// dtype (float32/float64 computed natively, float16/bfloat16 in float32, like the CPU kernels).
// scale and zp are float32 device arrays of `channels` values as given by the user (zp not yet
// rounded); the kernels compute inv = 1.0f / scale and, for LSQ, the rounded and clamped zero
// point themselves, exactly like the CPU's read_params. Per-element formulas: kernel_math.h;
// work partition and reduction order: kernel_plan.h. Semantics: csrc/cpu/fake_quant.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ompq {
namespace cuda {

enum class FqDType { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct FqShape {
  int64_t outer;
  int64_t channels;
  int64_t inner;
};

// *bad (device int) = 1 when some channel fails the CPU's read_params checks, else 0.
// One block; the caller reads *bad back (its only device-to-host sync).
cudaError_t fq_check_params(const float* scale, const float* zp, int64_t channels, float qmin,
                            float qmax, bool round_zp, int* bad, cudaStream_t stream);

// y = clamp(rint(x * inv) + 0, qmin - zp, qmax - zp) * scale  (NaN -> qmin); round_zp: LSQ.
cudaError_t fake_quant_forward(const void* x, void* y, FqDType dtype, const float* scale,
                               const float* zp, FqShape shape, float qmin, float qmax,
                               bool round_zp, cudaStream_t stream);

// gx = g * (qmin <= rint(x * inv) + zp <= qmax).
cudaError_t fake_quant_backward(const void* g, const void* x, void* gx, FqDType dtype,
                                const float* scale, const float* zp, FqShape shape, float qmin,
                                float qmax, cudaStream_t stream);

// Number of fp64 scratch values lsq_backward needs (partial sums of the scale and zero-point
// gradients, plus the second finalise level for very many partials per channel).
int64_t lsq_scratch_doubles(FqShape shape);

// LSQ backward: writes gx and the per-channel sums of the scale / zero-point gradients into
// out_s / out_z (float32 or float64 as flagged), via per-item partial sums (plain stores) and a
// finalise (one 256-thread block per channel, or two fixed levels for very many partials) that
// adds them in an order fixed by the shape, in fp64: bitwise reproducible.
cudaError_t lsq_backward(const void* g, const void* x, void* gx, FqDType dtype,
                         const float* scale, const float* zp, FqShape shape, float qmin,
                         float qmax, float grad_factor, double* scratch, void* out_s,
                         bool out_s_double, void* out_z, bool out_z_double,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace ompq
