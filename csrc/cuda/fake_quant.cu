// CUDA kernels for fake_quant / lsq_fake_quant (float32). CUDA runtime headers only.
//
// Arithmetic uses the round-to-nearest intrinsics (__fmul_rn, __fadd_rn, __fsub_rn), which the
// compiler never contracts into FMAs, and rintf (round half to even), so results equal the CPU
// kernels and torch's element formulas bit for bit (denormals may flush to zero under
// --use_fast_math).
#include "fake_quant.h"

namespace ompq {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int64_t channel_of(int64_t i, const FqShape& s) {
  return s.channels == 1 ? 0 : (i / s.inner) % s.channels;
}

__device__ __forceinline__ float clamp_nan_low(float q, float qmin, float qmax) {
  if (!(q >= qmin)) q = qmin;  // NaN and below -> qmin
  return q > qmax ? qmax : q;
}

__global__ void fq_forward_kernel(const float* __restrict__ x, float* __restrict__ y,
                                  const float* __restrict__ scale, const float* __restrict__ inv,
                                  const float* __restrict__ zp, FqShape s, int64_t n, float qmin,
                                  float qmax) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(i, s);
    const float z = zp[c];
    const float q = clamp_nan_low(__fadd_rn(rintf(__fmul_rn(x[i], inv[c])), z), qmin, qmax);
    y[i] = __fmul_rn(__fsub_rn(q, z), scale[c]);
  }
}

__global__ void fq_backward_kernel(const float* __restrict__ g, const float* __restrict__ x,
                                   float* __restrict__ gx, const float* __restrict__ inv,
                                   const float* __restrict__ zp, FqShape s, int64_t n,
                                   float qmin, float qmax) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of(i, s);
    const float q = __fadd_rn(rintf(__fmul_rn(x[i], inv[c])), zp[c]);
    gx[i] = __fmul_rn(g[i], (q >= qmin && q <= qmax) ? 1.0f : 0.0f);
  }
}

// Block (bx, c) reduces a strided share of channel c's outer*inner elements.
__global__ void lsq_backward_kernel(const float* __restrict__ g, const float* __restrict__ x,
                                    float* __restrict__ gx, const float* __restrict__ scale,
                                    const float* __restrict__ inv, const float* __restrict__ zp,
                                    FqShape s, float qmin, float qmax, float gf,
                                    double* __restrict__ acc_s, double* __restrict__ acc_z) {
  const int64_t c = blockIdx.y;
  const float sc = scale[c], iv = inv[c], z = zp[c];
  const float low = __fsub_rn(qmin, z), high = __fsub_rn(qmax, z);
  const int64_t per_channel = s.outer * s.inner;
  double ds = 0.0, dz = 0.0;
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < per_channel;
       k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t o = k / s.inner;
    const int64_t i = (o * s.channels + c) * s.inner + (k - o * s.inner);
    const float gv = g[i], xv = x[i];
    const float xq = rintf(__fadd_rn(z, __fmul_rn(xv, iv)));
    const bool inside = xq >= qmin && xq <= qmax;
    gx[i] = __fmul_rn(gv, inside ? 1.0f : 0.0f);
    if (inside) {
      const float xfq = __fmul_rn(__fsub_rn(xq, z), sc);
      ds += __fmul_rn(__fmul_rn(__fmul_rn(gv, __fsub_rn(xfq, xv)), iv), gf);
    } else {
      ds += __fmul_rn(__fmul_rn(gv, xq > qmax ? high : low), gf);
      dz += __fmul_rn(__fmul_rn(-gv, sc), gf);
    }
  }
  __shared__ double sh_s[kThreads], sh_z[kThreads];
  sh_s[threadIdx.x] = ds;
  sh_z[threadIdx.x] = dz;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      sh_s[threadIdx.x] += sh_s[threadIdx.x + w];
      sh_z[threadIdx.x] += sh_z[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    atomicAdd(acc_s + c, sh_s[0]);
    atomicAdd(acc_z + c, sh_z[0]);
  }
}

int blocks_for(int64_t n, int64_t cap) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > cap ? cap : b));
}

}  // namespace

cudaError_t fake_quant_forward(const float* x, float* y, const float* scale, const float* inv,
                               const float* zp, FqShape shape, float qmin, float qmax,
                               cudaStream_t stream) {
  const int64_t n = shape.outer * shape.channels * shape.inner;
  if (n == 0) return cudaSuccess;
  fq_forward_kernel<<<blocks_for(n, 65535), kThreads, 0, stream>>>(x, y, scale, inv, zp, shape,
                                                                   n, qmin, qmax);
  return cudaGetLastError();
}

cudaError_t fake_quant_backward(const float* g, const float* x, float* gx, const float* inv,
                                const float* zp, FqShape shape, float qmin, float qmax,
                                cudaStream_t stream) {
  const int64_t n = shape.outer * shape.channels * shape.inner;
  if (n == 0) return cudaSuccess;
  fq_backward_kernel<<<blocks_for(n, 65535), kThreads, 0, stream>>>(g, x, gx, inv, zp, shape, n,
                                                                    qmin, qmax);
  return cudaGetLastError();
}

cudaError_t lsq_backward(const float* g, const float* x, float* gx, const float* scale,
                         const float* inv, const float* zp, FqShape shape, float qmin,
                         float qmax, float grad_factor, double* acc_scale, double* acc_zp,
                         cudaStream_t stream) {
  const int64_t per_channel = shape.outer * shape.inner;
  if (per_channel == 0 || shape.channels == 0) return cudaSuccess;
  if (shape.channels > 65535) return cudaErrorInvalidConfiguration;
  // About 2k blocks in total, spread over the channels.
  int64_t cap = 2048 / shape.channels;
  cap = cap < 1 ? 1 : cap;
  dim3 grid(blocks_for(per_channel, cap), static_cast<unsigned>(shape.channels));
  lsq_backward_kernel<<<grid, kThreads, 0, stream>>>(g, x, gx, scale, inv, zp, shape, qmin, qmax,
                                                     grad_factor, acc_scale, acc_zp);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ompq
