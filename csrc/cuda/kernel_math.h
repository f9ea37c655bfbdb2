// Per-element math of the CUDA kernels, shared with a host-side test (tests/cpp/test_cuda_host.cpp)
// that runs exactly this code on the CPU against the CPU kernels.
//
// Compiled by nvcc the functions are __host__ __device__; on the device every multiply, add,
// subtract and divide uses the round-to-nearest intrinsics (__fmul_rn, ...), which nvcc never
// contracts into FMAs. On the host they are plain operators: the CPU build uses
// -ffp-contract=off, so both evaluate the same IEEE operations in the same order, matching the
// CPU kernels (csrc/cpu/fake_quant.cpp, csrc/cpu/adaround.cpp) element for element.
// Only CUDA runtime headers (none here) and <cmath>; no torch types.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define OMPQ_HD __host__ __device__ __forceinline__
#else
#define OMPQ_HD inline
#endif

namespace ompq {
namespace kmath {

// ---- IEEE round-to-nearest primitives (never contracted) -------------------------------------
OMPQ_HD float mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
OMPQ_HD double mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
OMPQ_HD float add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
OMPQ_HD double add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
OMPQ_HD float sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
OMPQ_HD double sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
OMPQ_HD float div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
OMPQ_HD double div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
// Round half to even (the default rounding mode on the host).
OMPQ_HD float rnd(float a) {
#if defined(__CUDA_ARCH__)
  return rintf(a);
#else
  return std::nearbyint(a);
#endif
}
OMPQ_HD double rnd(double a) {
#if defined(__CUDA_ARCH__)
  return rint(a);
#else
  return std::nearbyint(a);
#endif
}
OMPQ_HD float flr(float a) {
#if defined(__CUDA_ARCH__)
  return floorf(a);
#else
  return std::floor(a);
#endif
}
OMPQ_HD double flr(double a) {
#if defined(__CUDA_ARCH__)
  return floor(a);
#else
  return std::floor(a);
#endif
}
// exp / pow: the device library and the CPU's vectorised versions differ in the last bits.
OMPQ_HD float ex(float a) {
#if defined(__CUDA_ARCH__)
  return expf(a);
#else
  return std::exp(a);
#endif
}
OMPQ_HD double ex(double a) {
#if defined(__CUDA_ARCH__)
  return exp(a);
#else
  return std::exp(a);
#endif
}
OMPQ_HD float pw(float a, float b) {
#if defined(__CUDA_ARCH__)
  return powf(a, b);
#else
  return std::pow(a, b);
#endif
}
OMPQ_HD double pw(double a, double b) {
#if defined(__CUDA_ARCH__)
  return pow(a, b);
#else
  return std::pow(a, b);
#endif
}
// Finite: a - a is 0 for finite a and NaN for +-Inf and NaN.
OMPQ_HD bool finite(float a) { return sub(a, a) == 0.0f; }

// ---- fake_quant / lsq_fake_quant -------------------------------------------------------------
// Per-channel coefficients, built exactly like the CPU's read_params + coef<T>:
// scale, 1/scale and the zero point in float32 (the LSQ zero point rounded half to even and
// clamped to [qmin, qmax]), then widened to the compute type T (float or double).
template <typename T>
struct FqCoef {
  T s, inv, z, qmin, qmax, gf;
  T lo, hi;  // qmin - z, qmax - z
};

// True when the CPU's read_params accepts (scale, zero point) of one channel.
OMPQ_HD bool fq_params_ok(float s, float z, float qmin, float qmax, bool round_zp) {
  if (!(finite(s) && s > 0.0f)) return false;
  if (!finite(div(1.0f, s))) return false;
  if (!finite(z)) return false;
  if (!round_zp && !(z >= qmin && z <= qmax)) return false;
  return true;
}

template <typename T>
OMPQ_HD FqCoef<T> make_fq_coef(float s, float z_raw, float qmin, float qmax, bool round_zp,
                               float gf) {
  const float inv = div(1.0f, s);
  float z = z_raw;
  if (round_zp) {
    z = rnd(z);
    z = z < qmin ? qmin : z;  // std::max(z, qmin)
    z = qmax < z ? qmax : z;  // std::min(z, qmax)
  }
  FqCoef<T> k;
  k.s = static_cast<T>(s);
  k.inv = static_cast<T>(inv);
  k.z = static_cast<T>(z);
  k.qmin = static_cast<T>(qmin);
  k.qmax = static_cast<T>(qmax);
  k.gf = static_cast<T>(gf);
  k.lo = sub(k.qmin, k.z);
  k.hi = sub(k.qmax, k.z);
  return k;
}

// y = clamp(rint(x * inv) + 0, qmin - z, qmax - z) * s  (NaN -> qmin - z), bit-identical to
// (clamp(rint(x * inv) + z, qmin, qmax) - z) * s; the CPU's vector formula.
template <typename T>
OMPQ_HD T fq_forward(T x, const FqCoef<T>& k) {
  T t = add(rnd(mul(x, k.inv)), T(0));
  t = t >= k.lo ? t : k.lo;  // max(t, lo) with NaN -> lo
  t = t < k.hi ? t : k.hi;   // min(t, hi)
  return mul(t, k.s);
}

// grad * (qmin <= rint(x * inv) + z <= qmax): a multiply, so Inf * 0 = NaN like torch.
template <typename T>
OMPQ_HD T fq_backward(T g, T x, const FqCoef<T>& k) {
  const T t = rnd(mul(x, k.inv));
  return mul(g, (t >= k.lo && t <= k.hi) ? T(1) : T(0));
}

// LSQ backward of one element: returns grad_x and writes the element's terms of grad_scale and
// grad_zero_point (torch's learnable formulas in torch's operation order, grad_factor last, as
// the CPU kernel; NaN and -Inf count as below, +Inf as above).
template <typename T>
OMPQ_HD T lsq_backward(T g, T x, const FqCoef<T>& k, T* ds, T* dz) {
  const T xq = rnd(add(k.z, mul(x, k.inv)));
  const bool inside = xq >= k.qmin && xq <= k.qmax;
  if (inside) {
    *ds = mul(mul(mul(g, sub(mul(sub(xq, k.z), k.s), x)), k.inv), k.gf);
    *dz = T(0);
  } else {
    *ds = mul(mul(g, xq > k.qmax ? k.hi : k.lo), k.gf);
    *dz = mul(mul(mul(g, T(-1)), k.s), k.gf);
  }
  return mul(g, inside ? T(1) : T(0));
}

// ---- AdaRound --------------------------------------------------------------------------------
// h(v) = clamp(sigmoid(v) * (zeta - gamma) + gamma, 0, 1); *dh = h'(v) (0 where clamped, NaN for
// NaN v, like the CPU's in * c * sig * (1 - sig)).
template <typename T>
OMPQ_HD T ada_soft_h(T v, T* dh) {
  const T c = static_cast<T>(1.1 - (-0.1));
  const T gamma = static_cast<T>(-0.1);
  const T sig = div(T(1), add(T(1), ex(-v)));
  const T raw = add(mul(sig, c), gamma);
  if (dh != nullptr) {
    const T in = (raw >= T(0) && raw <= T(1)) ? T(1) : T(0);
    *dh = mul(mul(mul(in, c), sig), sub(T(1), sig));
  }
  return raw < T(0) ? T(0) : (raw > T(1) ? T(1) : raw);  // NaN stays NaN
}

template <typename T>
OMPQ_HD T ada_h(T v, bool soft, T* dh) {
  if (soft) return ada_soft_h(v, dh);
  if (dh != nullptr) *dh = T(0);
  return v >= T(0) ? T(1) : T(0);
}

// t = floor(w / s) + h + z
template <typename T>
OMPQ_HD T ada_t(T w, T h, T s, T z) {
  return add(add(flr(div(w, s)), h), z);
}

// y = (clamp(t, qmin, qmax) - z) * s, NaN t stays NaN (at::vec::clamp).
template <typename T>
OMPQ_HD T ada_forward(T w, T v, T s, T z, T qmin, T qmax, bool soft) {
  const T t = ada_t(w, ada_h(v, soft, static_cast<T*>(nullptr)), s, z);
  const T c = t < qmin ? qmin : (t > qmax ? qmax : t);
  return mul(sub(c, z), s);
}

// gw = g * [qmin <= t <= qmax]; gv = gw * s * h'(v) (soft) or 0 (hard).
template <typename T>
OMPQ_HD void ada_backward(T g, T w, T v, T s, T z, T qmin, T qmax, bool soft, T* gw, T* gv) {
  T dh = T(0);
  const T t = ada_t(w, ada_h(v, soft, &dh), s, z);
  const T gin = mul(g, (t >= qmin && t <= qmax) ? T(1) : T(0));
  *gw = gin;
  *gv = soft ? mul(mul(gin, s), dh) : T(0);
}

// 1 - |2h(v) - 1|^beta
template <typename T>
OMPQ_HD T ada_reg(T v, T beta) {
  const T h = ada_soft_h(v, static_cast<T*>(nullptr));
  T u = sub(mul(T(2), h), T(1));
  u = u < T(0) ? -u : u;
  return sub(T(1), pw(u, beta));
}

// d/dv of g * (1 - |u|^beta) = gs * beta * |u|^(beta-1) * sign(u) * h'(v), gs = -2 g; 0 at u = 0.
template <typename T>
OMPQ_HD T ada_reg_backward(T gs, T v, T beta, T beta_m1) {
  T dh;
  const T h = ada_soft_h(v, &dh);
  const T u = sub(mul(T(2), h), T(1));
  if (u == T(0)) return T(0);
  const T sign = u > T(0) ? T(1) : (u < T(0) ? T(-1) : T(0));
  const T a = u < T(0) ? -u : u;
  return mul(mul(mul(mul(gs, beta), pw(a, beta_m1)), sign), dh);
}

}  // namespace kmath
}  // namespace ompq
