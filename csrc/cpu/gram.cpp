// centered_gram(x) -> N×N fp32 Gram of the column-centred N×D input (CPU).
//
// Design: D is processed in cache-sized column chunks. For each chunk a thread transposes the
// chunk (converted to fp32) into a small reusable buffer (one row of N samples per feature),
// subtracts each feature's mean over the samples, and accumulates the chunk's Gram with an
// outer-product register-tiled micro-kernel (R rows × up to 4 vectors) on the upper triangle only
// (the Gram is symmetric). Chunks are distributed over threads with
// at::parallel_for; each thread keeps its own fp64 N×N accumulator, summed in a fixed order at the
// end. Centring happens BEFORE the product, so a large mean does not cancel catastrophically.
// No N×D temporary is allocated.

#include "vec_capability.h"  // first: picks the at::vec implementation

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "gram_adaround.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <vector>

namespace ompq {

at::Tensor gram_prepare_input(const at::Tensor& x_in) {
  TORCH_CHECK_VALUE(x_in.dim() >= 2,
              "centered_gram: expected an N×D matrix (N samples along dim 0, features flattened), "
              "got a ", x_in.dim(), "-D tensor of shape ", x_in.sizes());
  const int64_t n = x_in.size(0);
  TORCH_CHECK_VALUE(n >= 2, "centered_gram: need at least 2 samples (rows) to centre, got N = ", n);
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "centered_gram: unsupported dtype ", dtype,
              "; expected float32, float16 or bfloat16 (convert with .float())");
  at::Tensor x = x_in.reshape({n, -1});
  if (x.size(1) > 0 && x.stride(1) != 1) x = x.contiguous();
  return x;
}

void gram_check_finite(const at::Tensor& out) {
  TORCH_CHECK_VALUE(at::isfinite(out).all().item<bool>(),
              "centered_gram: the input contains NaN or Inf (or values so large that the fp32 "
              "Gram overflows); clean or rescale the features first");
}

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();

// Load kVec elements as fp32.
inline Vec load_f32(const float* p) { return Vec::loadu(p); }
inline Vec load_f32(const at::Half* p) {
  Vec v;
  at::vec::load_fp32_from_fp16(p, v);
  return v;
}
inline Vec load_f32(const at::BFloat16* p) {
  Vec v;
  at::vec::load_fp32_from_bf16(p, v);
  return v;
}

constexpr int64_t kRowBlock = 16;  // samples are padded to a multiple of this
constexpr int64_t kMaxVecs = 4;    // column vectors per micro-kernel call
constexpr int64_t kKBlock = 256;   // k steps accumulated in registers before a flush

// Column chunk width: the transposed centred chunk (width × Np fp32) should sit in L2.
int64_t chunk_width(int64_t np, int64_t d) {
  int64_t w = (256 * 1024) / (4 * np);
  w = std::max<int64_t>(64, std::min<int64_t>(w, 4096));
  return std::min(w, d);
}

// Convert `cols` columns of `rows` rows of x to fp32 (row stride ld) into dst (row stride ldd).
template <typename T>
void rows_to_f32(const T* x, int64_t rows, int64_t ld, int64_t cols, float* dst, int64_t ldd) {
  const int64_t vend = cols - cols % kVec;
  for (int64_t r = 0; r < rows; ++r) {
    const T* src = x + r * ld;
    float* out = dst + r * ldd;
    int64_t k = 0;
    for (; k < vend; k += kVec) load_f32(src + k).store(out + k);
    for (; k < cols; ++k) out[k] = static_cast<float>(src[k]);
  }
}

// Write columns [col0, col0 + cols) of x (n rows, row stride ld), centred over the n samples, into
// bt transposed: bt[k * np + i] = x[i][col0 + k] - mean_k, with bt[k][n..np) = 0.
// `stage` is scratch of kRowBlock × cols floats (used for 16-bit inputs).
// Masked variant (`mcol` not null): column c belongs to token c / h, and sample i's value is
// multiplied by mcol[(c / h) * np + i] (0 or 1) before the mean, i.e. padded positions are 0.
template <typename T>
void centre_chunk_t(const T* x, int64_t n, int64_t np, int64_t ld, int64_t col0, int64_t cols,
                    float* stage, float* bt, const float* mcol = nullptr, int64_t h = 1) {
  for (int64_t r0 = 0; r0 < n; r0 += kRowBlock) {
    const int rows = static_cast<int>(std::min(kRowBlock, n - r0));
    if constexpr (std::is_same_v<T, float>) {
      at::vec::transpose_mxn<float>(x + r0 * ld + col0, ld, bt + r0, np, rows,
                                    static_cast<int>(cols));
    } else {
      rows_to_f32(x + r0 * ld + col0, rows, ld, cols, stage, cols);
      at::vec::transpose_mxn<float>(stage, cols, bt + r0, np, rows, static_cast<int>(cols));
    }
  }
  const float inv_n = 1.f / static_cast<float>(n);
  for (int64_t k = 0; k < cols; ++k) {
    float* row = bt + k * np;
    for (int64_t i = n; i < np; ++i) row[i] = 0.f;
    if (mcol != nullptr) {
      const float* m = mcol + ((col0 + k) / h) * np;
      for (int64_t i = 0; i < np; i += kVec) (Vec::loadu(row + i) * Vec::loadu(m + i)).store(row + i);
    }
    Vec s(0.f);
    for (int64_t i = 0; i < np; i += kVec) s = s + Vec::loadu(row + i);
    const float mean =
        at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, s) * inv_n;
    const Vec vm(mean);
    for (int64_t i = 0; i < np; i += kVec) (Vec::loadu(row + i) - vm).store(row + i);
    for (int64_t i = n; i < np; ++i) row[i] = 0.f;
  }
}

// c[i0 + r][j0 + kVec·v ...] += Σ_{k in [k0, k1)} bt[k][i0 + r] · bt[k][j0 + kVec·v ...]
// for r < R, v < V: an R × (V·kVec) register tile of the Gram (outer-product form).
template <int R, int V>
void gram_tile(const float* bt, int64_t np, int64_t k0, int64_t k1, int64_t i0, int64_t j0,
               float* c) {
  Vec acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = Vec(0.f);
  for (int64_t k = k0; k < k1; ++k) {
    const float* row = bt + k * np;
    Vec b[V];
    for (int v = 0; v < V; ++v) b[v] = Vec::loadu(row + j0 + v * kVec);
    for (int r = 0; r < R; ++r) {
      const Vec a(row[i0 + r]);
      for (int v = 0; v < V; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) {
      float* p = c + (i0 + r) * np + j0 + v * kVec;
      (Vec::loadu(p) + acc[r][v]).store(p);
    }
}

using TileFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*);
#define OMPQ_TILE_ROW(R) {&gram_tile<R, 1>, &gram_tile<R, 2>, &gram_tile<R, 3>, &gram_tile<R, 4>}
const TileFn kTiles[12][4] = {OMPQ_TILE_ROW(1), OMPQ_TILE_ROW(2),  OMPQ_TILE_ROW(3),
                              OMPQ_TILE_ROW(4), OMPQ_TILE_ROW(5),  OMPQ_TILE_ROW(6),
                              OMPQ_TILE_ROW(7), OMPQ_TILE_ROW(8),  OMPQ_TILE_ROW(9),
                              OMPQ_TILE_ROW(10), OMPQ_TILE_ROW(11), OMPQ_TILE_ROW(12)};
#undef OMPQ_TILE_ROW
// Rows per tile for V column vectors: keeps R·V ≤ 24 accumulators (of 32 vector registers).
constexpr int kRowsFor[5] = {0, 12, 12, 8, 6};

// Upper triangle (plus a few entries below it) of the Gram of the centred, transposed chunk
// bt (cols × np), added to c (np × np, fp32). Only rows < n are computed.
void chunk_gram_t(const float* bt, int64_t n, int64_t np, int64_t cols, float* c) {
  const int64_t nv = np / kVec;
  for (int64_t k0 = 0; k0 < cols; k0 += kKBlock) {
    const int64_t k1 = std::min(cols, k0 + kKBlock);
    for (int64_t g0 = 0; g0 < nv; g0 += kMaxVecs) {
      const int64_t gend = std::min(nv, g0 + kMaxVecs);
      const int64_t row_end = std::min(n, gend * kVec);
      for (int64_t i0 = 0; i0 < row_end;) {
        const int64_t vs = std::max(g0, i0 / kVec);
        const int v = static_cast<int>(gend - vs);
        const int r = static_cast<int>(std::min<int64_t>(kRowsFor[v], row_end - i0));
        kTiles[r - 1][v - 1](bt, np, k0, k1, i0, vs * kVec, c);
        i0 += r;
      }
    }
  }
}

template <typename T>
void gram_impl(const T* x, int64_t n, int64_t d, int64_t ld, float* out,
               const float* mcol = nullptr, int64_t h = 1) {
  static_assert(kRowBlock % kVec == 0, "row padding must be a multiple of the vector width");
  const int64_t np = ((n + kRowBlock - 1) / kRowBlock) * kRowBlock;
  const int64_t cw = chunk_width(np, d);
  const int64_t nchunks = (d + cw - 1) / cw;
  const int64_t nslots = std::max<int64_t>(1, at::get_num_threads());
  std::vector<std::vector<double>> slots(nslots);
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), nslots - 1);
    std::vector<double>& g = slots[tid];
    if (g.empty()) g.assign(n * n, 0.0);
    std::vector<float> bt(cw * np, 0.f);
    std::vector<float> c(np * np);
    std::vector<float> stage(std::is_same_v<T, float> ? 0 : kRowBlock * cw);
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t col0 = ch * cw;
      const int64_t cols = std::min(cw, d - col0);
      centre_chunk_t(x, n, np, ld, col0, cols, stage.data(), bt.data(), mcol, h);
      std::fill(c.begin(), c.end(), 0.f);
      chunk_gram_t(bt.data(), n, np, cols, c.data());
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = i; j < n; ++j) g[i * n + j] += static_cast<double>(c[i * np + j]);
    }
  });
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i; j < n; ++j) {
      double s = 0.0;
      for (const auto& g : slots)
        if (!g.empty()) s += g[i * n + j];
      out[i * n + j] = static_cast<float>(s);
      out[j * n + i] = static_cast<float>(s);
    }
}

// The Gram of x (checked N×D, see gram_prepare_input), optionally masked per token (mcol, h).
at::Tensor gram_dispatch(const at::Tensor& x, const float* mcol, int64_t h) {
  const int64_t n = x.size(0), d = x.size(1);
  at::Tensor out = at::zeros({n, n}, x.options().dtype(at::kFloat));
  if (d == 0) return out;
  const int64_t ld = x.stride(0);
  float* o = out.data_ptr<float>();
  const auto dtype = x.scalar_type();
  if (dtype == at::kFloat) {
    gram_impl(x.const_data_ptr<float>(), n, d, ld, o, mcol, h);
  } else if (dtype == at::kHalf) {
    gram_impl(x.const_data_ptr<at::Half>(), n, d, ld, o, mcol, h);
  } else {
    gram_impl(x.const_data_ptr<at::BFloat16>(), n, d, ld, o, mcol, h);
  }
  gram_check_finite(out);
  return out;
}

at::Tensor centered_gram_cpu(const at::Tensor& x_in) {
  return gram_dispatch(gram_prepare_input(x_in), nullptr, 1);
}

// centered_gram_masked(x, mask): the Gram of x (N×T×…) with x[i, t] set to 0 where mask[i, t]
// is 0 (padded tokens), without materialising the masked copy: the mask is applied to each
// column chunk while it is transposed and centred.
at::Tensor centered_gram_masked_cpu(const at::Tensor& x_in, const at::Tensor& mask) {
  TORCH_CHECK_VALUE(x_in.dim() >= 3, "centered_gram_masked: expected an (N, T, ...) feature, got "
                    "shape ", x_in.sizes());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == x_in.size(0) &&
                        mask.size(1) == x_in.size(1),
                    "centered_gram_masked: the mask must be (N, T) = (", x_in.size(0), ", ",
                    x_in.size(1), ") like the feature's first two dims, got ", mask.sizes());
  const at::Tensor x = gram_prepare_input(x_in);
  const int64_t n = x.size(0), t = mask.size(1);
  const int64_t h = t > 0 ? x.size(1) / t : 1;
  const int64_t np = ((n + kRowBlock - 1) / kRowBlock) * kRowBlock;
  // Transposed mask, one row of np samples per token (padding samples: 0).
  const at::Tensor m = mask.to(at::kFloat).contiguous();
  const float* mp = m.const_data_ptr<float>();
  std::vector<float> mcol(std::max<int64_t>(t, 1) * np, 0.f);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < t; ++k) mcol[k * np + i] = mp[i * t + k] != 0.f ? 1.f : 0.f;
  return gram_dispatch(x, mcol.data(), std::max<int64_t>(h, 1));
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_FRAGMENT(ompq, m) {
  m.def("centered_gram(Tensor x) -> Tensor");
  m.def("centered_gram_masked(Tensor x, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(ompq, CPU, m) {
  m.impl("centered_gram", &ompq::centered_gram_cpu);
  m.impl("centered_gram_masked", &ompq::centered_gram_masked_cpu);
}
