// AdaRound ops on CUDA: fused element-wise forward/backward and a deterministic regulariser sum.
#include <cuda_runtime.h>

#include <cstdint>

#include "adaround.h"

namespace ompq {
namespace cuda {
namespace {

constexpr double kZeta = 1.1;
constexpr double kGamma = -0.1;
constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;
constexpr int kRegBlocks = 1024;

__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float exp_(float a) { return expf(a); }
__device__ __forceinline__ double exp_(double a) { return exp(a); }
__device__ __forceinline__ float pow_(float a, float b) { return powf(a, b); }
__device__ __forceinline__ double pow_(double a, double b) { return pow(a, b); }

// Rectified sigmoid h(v); *dh = h'(v) (zero where the clamp is active).
template <typename T>
__device__ __forceinline__ T soft_h(T v, T* dh) {
  const T sig = T(1) / (T(1) + exp_(-v));
  const T raw = sig * static_cast<T>(kZeta - kGamma) + static_cast<T>(kGamma);
  const bool in = raw >= T(0) && raw <= T(1);
  if (dh != nullptr) *dh = in ? static_cast<T>(kZeta - kGamma) * sig * (T(1) - sig) : T(0);
  return raw < T(0) ? T(0) : (raw > T(1) ? T(1) : raw);  // NaN stays NaN
}

template <typename T>
__device__ __forceinline__ T clamp_nan(T t, T lo, T hi) {
  return t < lo ? lo : (t > hi ? hi : t);
}

int blocks_for(int64_t numel) {
  const int64_t b = (numel + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > kMaxBlocks ? kMaxBlocks : b));
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ w, const T* __restrict__ v,
                               const T* __restrict__ scale, const T* __restrict__ zp,
                               T* __restrict__ out, QuantLayout lay, bool soft) {
  const T lo = static_cast<T>(lay.qmin), hi = static_cast<T>(lay.qmax);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < lay.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = (i / lay.inner) % lay.channels;
    const T s = scale[c], z = zp[c];
    const T h = soft ? soft_h<T>(v[i], nullptr) : (v[i] >= T(0) ? T(1) : T(0));
    const T t = floor(div_rn(w[i], s)) + h + z;
    out[i] = (clamp_nan(t, lo, hi) - z) * s;
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ w,
                                const T* __restrict__ v, const T* __restrict__ scale,
                                const T* __restrict__ zp, T* __restrict__ gw, T* __restrict__ gv,
                                QuantLayout lay, bool soft) {
  const T lo = static_cast<T>(lay.qmin), hi = static_cast<T>(lay.qmax);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < lay.numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = (i / lay.inner) % lay.channels;
    const T s = scale[c], z = zp[c];
    T dh = T(0);
    const T h = soft ? soft_h<T>(v[i], &dh) : (v[i] >= T(0) ? T(1) : T(0));
    const T t = floor(div_rn(w[i], s)) + h + z;
    const T g = (t >= lo && t <= hi) ? grad[i] : grad[i] * T(0);
    gw[i] = g;
    gv[i] = soft ? g * s * dh : T(0);
  }
}

template <typename T>
__global__ void reg_partial_kernel(const T* __restrict__ v, int64_t numel, T beta,
                                   double* __restrict__ partials) {
  __shared__ double red[kThreads];
  double s = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T h = soft_h<T>(v[i], nullptr);
    T u = T(2) * h - T(1);
    u = u < T(0) ? -u : u;
    s += static_cast<double>(T(1) - pow_(u, beta));
  }
  red[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = red[0];
}

template <typename T>
__global__ void reg_final_kernel(const double* __restrict__ partials, int count, T* out) {
  __shared__ double red[kThreads];
  double s = 0.0;
  for (int i = threadIdx.x; i < count; i += kThreads) s += partials[i];
  red[threadIdx.x] = s;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) red[threadIdx.x] += red[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<T>(red[0]);
}

template <typename T>
__global__ void reg_backward_kernel(const T* __restrict__ grad, const T* __restrict__ v,
                                    int64_t numel, T beta, T* __restrict__ gv) {
  const T g = grad[0];
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T dh;
    const T h = soft_h<T>(v[i], &dh);
    const T u = T(2) * h - T(1);
    if (u == T(0)) {
      gv[i] = T(0);
      continue;
    }
    const T sign = u > T(0) ? T(1) : T(-1);
    const T a = u * sign;
    gv[i] = T(-2) * g * beta * pow_(a, beta - T(1)) * sign * dh;
  }
}

template <typename T>
cudaError_t forward_impl(const T* w, const T* v, const T* scale, const T* zp, T* out,
                         QuantLayout lay, bool soft, cudaStream_t stream) {
  if (lay.numel == 0) return cudaSuccess;
  forward_kernel<T><<<blocks_for(lay.numel), kThreads, 0, stream>>>(w, v, scale, zp, out, lay,
                                                                     soft);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_impl(const T* grad, const T* w, const T* v, const T* scale, const T* zp,
                          T* gw, T* gv, QuantLayout lay, bool soft, cudaStream_t stream) {
  if (lay.numel == 0) return cudaSuccess;
  backward_kernel<T><<<blocks_for(lay.numel), kThreads, 0, stream>>>(grad, w, v, scale, zp, gw,
                                                                      gv, lay, soft);
  return cudaGetLastError();
}

template <typename T>
cudaError_t reg_impl(const T* v, int64_t numel, double beta, double* partials, T* out,
                     cudaStream_t stream) {
  const int blocks = adaround_reg_partials(numel);
  reg_partial_kernel<T><<<blocks, kThreads, 0, stream>>>(v, numel, static_cast<T>(beta), partials);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  reg_final_kernel<T><<<1, kThreads, 0, stream>>>(partials, blocks, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t reg_backward_impl(const T* grad, const T* v, int64_t numel, double beta, T* gv,
                              cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  reg_backward_kernel<T><<<blocks_for(numel), kThreads, 0, stream>>>(grad, v, numel,
                                                                      static_cast<T>(beta), gv);
  return cudaGetLastError();
}

}  // namespace

int adaround_reg_partials(int64_t numel) {
  const int64_t b = (numel + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > kRegBlocks ? kRegBlocks : b));
}

cudaError_t adaround_forward(const float* w, const float* v, const float* scale, const float* zp,
                             float* out, QuantLayout lay, bool soft, cudaStream_t stream) {
  return forward_impl(w, v, scale, zp, out, lay, soft, stream);
}
cudaError_t adaround_forward(const double* w, const double* v, const double* scale,
                             const double* zp, double* out, QuantLayout lay, bool soft,
                             cudaStream_t stream) {
  return forward_impl(w, v, scale, zp, out, lay, soft, stream);
}
cudaError_t adaround_backward(const float* grad, const float* w, const float* v,
                              const float* scale, const float* zp, float* gw, float* gv,
                              QuantLayout lay, bool soft, cudaStream_t stream) {
  return backward_impl(grad, w, v, scale, zp, gw, gv, lay, soft, stream);
}
cudaError_t adaround_backward(const double* grad, const double* w, const double* v,
                              const double* scale, const double* zp, double* gw, double* gv,
                              QuantLayout lay, bool soft, cudaStream_t stream) {
  return backward_impl(grad, w, v, scale, zp, gw, gv, lay, soft, stream);
}
cudaError_t adaround_reg(const float* v, int64_t numel, double beta, double* partials, float* out,
                         cudaStream_t stream) {
  return reg_impl(v, numel, beta, partials, out, stream);
}
cudaError_t adaround_reg(const double* v, int64_t numel, double beta, double* partials,
                         double* out, cudaStream_t stream) {
  return reg_impl(v, numel, beta, partials, out, stream);
}
cudaError_t adaround_reg_backward(const float* grad, const float* v, int64_t numel, double beta,
                                  float* gv, cudaStream_t stream) {
  return reg_backward_impl(grad, v, numel, beta, gv, stream);
}
cudaError_t adaround_reg_backward(const double* grad, const double* v, int64_t numel, double beta,
                                  double* gv, cudaStream_t stream) {
  return reg_backward_impl(grad, v, numel, beta, gv, stream);
}

}  // namespace cuda
}  // namespace ompq
