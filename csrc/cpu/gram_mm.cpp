// centered_gram_mm(x) -> N×N fp32 Gram of the column-centred N×D input, computed with the vendor
// GEMM (at::bmm / at::mm: MKL / oneDNN on CPU, cuBLAS on CUDA) plus an exact centring
// correction. Device-generic ATen: this file registers the CPU kernel; csrc/cuda/gram_glue.cpp
// registers the same code for CUDA and routes `centered_gram` to it for large problems.
//
// Math. For any row vector r, Y = X − 1·rᵀ has the same centred Gram as X, and
//     Gc = P·G·P,   G = Y·Yᵀ,   P = I − 1·1ᵀ/N,
// i.e. Gc = G − a·1ᵀ − 1·aᵀ + c·1·1ᵀ with a = G·1/N (= Y·ȳ, ȳ the column means of Y) and
// c = 1ᵀ·G·1/N² (= ȳᵀ·ȳ): the exact centring correction, applied in fp64 to the N×N product
// (O(N²) work; no second pass over X and no mean vector needed for it).
//
// Accuracy. The only rounding that matters is in the products: G is summed from fp32 GEMMs over
// column slices (fp32 accumulation within a slice, as the tiled kernels' register flushes), the
// slices' products added in fp64. That error is ≈ u·max_i G_ii, while the result's scale is
// max_i Gc_ii, so the cancellation factor κ = max_i G_ii / max_i Gc_ii multiplies it.
//   Pass 1 takes r = 0: the GEMM reads the input itself (no copy; fp16/bf16 on CUDA run on the
//   tensor cores with fp32 output and accumulation). Its result is kept when it is finite and
//   κ ≤ kMaxCancellation (random, post-ReLU or normalised features: κ ≈ 1..2).
//   Pass 2 (a mean large against the spread, e.g. a constant offset, or an fp32 overflow of the
//   uncentred product) subtracts r = the column means (fp32) group by group before the product,
//   so that Y is centred up to rounding and κ ≈ 1, as in the tiled kernels; it costs a second
//   GEMM over fp32 copies of the column groups.
// One device-to-host sync per pass (the κ / finiteness test).
//
// Memory: O(N²) (the fp64 accumulator and N×N results) plus, per column group, a scratch bounded
// by kBudgetCpu / kBudgetCuda whatever D (converted or centred slices, the B×N×N slice products
// and their fp64 copy). Nothing N×D is allocated.
//
// Precision settings: the GEMMs run under at::NoTF32Guard (thread-local: cuBLAS TF32 off for this
// call only). Where the fp32 matmul precision is reduced in a way that guard does not cover
// (oneDNN on CPU set to bf16/tf32, e.g. by torch.set_float32_matmul_precision("medium")), the
// products are computed in fp64 instead.

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include "../cuda/gram_mm.h"
#include "gram_adaround.h"

// at::mm / at::bmm with an out_dtype (fp16/bf16 operands, fp32 output and accumulation; CUDA
// only) are in the torch 2.9+ headers; older builds convert the 16-bit slices to fp32 instead.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define OMPQ_MM_OUT_DTYPE 1
#else
#define OMPQ_MM_OUT_DTYPE 0
#endif

namespace ompq {

bool gram_mm_needs_fp64(const at::Tensor& x) {
  const bool cuda = x.is_cuda();
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  const auto p = at::globalContext().float32Precision(
      cuda ? at::Float32Backend::CUDA : at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  // cuBLAS TF32 is switched off by at::NoTF32Guard; nothing else is.
  return p == at::Float32Precision::BF16 || (!cuda && p == at::Float32Precision::TF32);
#else
  if (cuda) return false;
  try {
    return at::globalContext().float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST;
  } catch (const c10::Error&) {  // mixed legacy / new precision settings: assume reduced
    return true;
  }
#endif
}

namespace {

// Columns per GEMM slice, i.e. how many products one fp32 accumulator sums before the fp64 add.
// IEEE fp32 GEMMs (round-to-nearest FMAs): 1024, measured on CPU as accurate as the tiled kernel
// (tests/test_ops_gram_mm.py). 16-bit operands on tensor cores: 256, the tiled kernels' flush,
// because their fp32 accumulation is not round-to-nearest on the GPUs studied so far (the aligned
// partial sums are truncated): an error that grows with the slice length (a model of it gives
// ~3e-7 relative at 256 columns, ~1.3e-6 at 1024). fp64 GEMMs: only bounds the batch count.
constexpr int64_t kSliceCols = 1024;
constexpr int64_t kSliceColsTensorCore = 256;
constexpr int64_t kSliceColsFp64 = 8192;
// Pass 1's result is kept when max_i G_ii ≤ kMaxCancellation · max_i Gc_ii (≤ 2 bits lost).
constexpr double kMaxCancellation = 4.0;
// Scratch per column group (see "Memory" above).
constexpr int64_t kBudgetCpu = int64_t{32} << 20;
constexpr int64_t kBudgetCuda = int64_t{256} << 20;

enum class Gemm {
  kFloat,   // fp32 operands (the fp32 input itself, or 16-bit slices converted), fp32 GEMM
  kMixed,   // fp16/bf16 operands, fp32 output and accumulation (CUDA; tensor cores)
  kDouble,  // fp64 operands: the fp32 matmul precision is reduced by a global setting
};

// The GEMM of pass 1 (r = 0) for input x.
Gemm first_pass_gemm(const at::Tensor& x) {
#if OMPQ_MM_OUT_DTYPE
  // fp16 with cuBLAS fp16 accumulation allowed (a global opt-in) stays on the fp32 route.
  if (x.is_cuda() && (x.scalar_type() == at::kBFloat16 ||
                      (x.scalar_type() == at::kHalf &&
                       !at::globalContext().allowFP16AccumulationCuBLAS()))) {
    return Gemm::kMixed;
  }
#endif
  return gram_mm_needs_fp64(x) ? Gemm::kDouble : Gemm::kFloat;
}

int64_t slice_cols(Gemm gemm) {
  switch (gemm) {
    case Gemm::kMixed: return kSliceColsTensorCore;
    case Gemm::kDouble: return kSliceColsFp64;
    default: return kSliceCols;
  }
}

// a·aᵀ for a (N×w) or a batch of them (B×N×w).
at::Tensor self_products(const at::Tensor& a, Gemm gemm) {
  const at::Tensor at_ = a.transpose(-2, -1);
  const bool batched = a.dim() == 3;
#if OMPQ_MM_OUT_DTYPE
  if (gemm == Gemm::kMixed) {
    return batched ? at::bmm(a, at_, at::kFloat) : at::mm(a, at_, at::kFloat);
  }
#endif
  return batched ? at::bmm(a, at_) : at::mm(a, at_);
}

// Adds Σ over the w-column slices of y (N×cols, unit column stride) of the slice's y·yᵀ, one GEMM
// per slice, into acc (N×N fp64); acc undefined on entry means zero.
void add_slice_products(const at::Tensor& y, Gemm gemm, int64_t w, at::Tensor& acc) {
  const int64_t cols = y.size(1);
  const int64_t full = cols / w;
  if (full > 0) {
    // The full slices as one batch, a view: (full, N, w) with strides (w, row stride, 1).
    const at::Tensor yb = y.narrow(1, 0, full * w).unflatten(1, {full, w}).transpose(0, 1);
    at::Tensor s = at::sum(self_products(yb, gemm), {0}, /*keepdim=*/false, at::kDouble);
    if (acc.defined()) {
      acc.add_(s);
    } else {
      acc = std::move(s);
    }
  }
  if (cols > full * w) {
    const at::Tensor p = self_products(y.narrow(1, full * w, cols - full * w), gemm);
    if (acc.defined()) {
      acc.add_(p);  // fp32 into fp64, converted on the fly
    } else {
      acc = p.to(at::kDouble);
    }
  }
}

// G = Y·Yᵀ in fp64 for Y = x (centre = false) or Y = x minus its fp32 column means (centre =
// true), column group by column group.
at::Tensor gram_products(const at::Tensor& x, Gemm gemm, bool centre) {
  const int64_t n = x.size(0), d = x.size(1);
  const int64_t w = slice_cols(gemm);
  // Per slice: a converted copy (≤ 8 bytes per element) and the N×N product with the fp64 copy
  // that the sum over slices makes (≤ 16 bytes per entry).
  const int64_t per_slice = 8 * n * w + 16 * n * n;
  const int64_t budget = x.is_cuda() ? kBudgetCuda : kBudgetCpu;
  const int64_t group = std::max<int64_t>(1, budget / per_slice) * w;
  const at::ScalarType op_type = gemm == Gemm::kDouble ? at::kDouble : at::kFloat;
  at::Tensor acc;
  for (int64_t k0 = 0; k0 < d; k0 += group) {
    const at::Tensor xg = x.narrow(1, k0, std::min(group, d - k0));
    at::Tensor y;
    if (centre) {
      // Subtracting any constant row leaves the centred Gram unchanged; the (rounded) column
      // means make Y centred up to rounding. fp32 (fp64) result by type promotion.
      y = at::sub(xg, at::mean(xg, {0}, /*keepdim=*/true, op_type));
    } else if (gemm == Gemm::kMixed || xg.scalar_type() == op_type) {
      y = xg;  // the GEMM reads the input in place
    } else {
      y = xg.to(op_type);
    }
    add_slice_products(y, gemm, w, acc);
  }
  return acc;
}

// P·g·P for the fp64 product g (symmetric up to the GEMM's rounding); exactly symmetric when g
// is: entry (i, j) is (g_ij − (b_i + b_j)) with b = row means − (grand mean)/2.
at::Tensor double_centre(const at::Tensor& g) {
  const at::Tensor a = g.mean({1}, /*keepdim=*/true);  // N×1: G·1/N
  const at::Tensor b = at::sub(a, a.mean(), 0.5);        // a − c/2
  return at::sub(g, at::add(b, b.t()));
}

}  // namespace

at::Tensor centered_gram_mm_impl(const at::Tensor& x_in) {
  const at::Tensor x = gram_prepare_input(x_in);
  const int64_t n = x.size(0), d = x.size(1);
  if (d == 0) return at::zeros({n, n}, x.options().dtype(at::kFloat));
  const at::NoTF32Guard no_tf32;
  const Gemm gemm = first_pass_gemm(x);

  // Pass 1: G = X·Xᵀ, then the exact centring.
  at::Tensor g = gram_products(x, gemm, /*centre=*/false);
  g = at::add(g, g.t()).mul_(0.5);  // exactly symmetric, so the result is too
  at::Tensor gc = double_centre(g);
  // One sync: the largest diagonal entries of G and Gc (NaN/Inf propagate to them: a
  // non-finite x_ik makes G_ii non-finite, and |Gc_ij| ≤ max_i Gc_ii bounds the fp32 range).
  const at::Tensor peaks =
      at::stack({g.diagonal().max(), gc.diagonal().max()}).to(at::kCPU);
  const double g_peak = peaks[0].item<double>(), gc_peak = peaks[1].item<double>();
  if (std::isfinite(g_peak) && std::isfinite(gc_peak) &&
      gc_peak <= static_cast<double>(std::numeric_limits<float>::max()) &&
      g_peak <= kMaxCancellation * gc_peak) {
    return gc.to(at::kFloat);
  }

  // Pass 2: centre each column group before the product.
  g = gram_products(x, gram_mm_needs_fp64(x) ? Gemm::kDouble : Gemm::kFloat, /*centre=*/true);
  g = at::add(g, g.t()).mul_(0.5);
  at::Tensor out = double_centre(g).to(at::kFloat);
  gram_check_finite(out);
  return out;
}

namespace {
at::Tensor centered_gram_mm_cpu(const at::Tensor& x) { return centered_gram_mm_impl(x); }
}  // namespace

}  // namespace ompq

TORCH_LIBRARY_FRAGMENT(ompq, m) {
  m.def("centered_gram_mm(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(ompq, CPU, m) {
  m.impl("centered_gram_mm", &ompq::centered_gram_mm_cpu);
}
