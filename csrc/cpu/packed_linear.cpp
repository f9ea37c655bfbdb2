// Packed low-bit weights for real quantized inference: pack_rows, unpack_rows, packed_linear
// (CPU kernels; the CUDA kernels are csrc/cuda/packed_linear.cu + packed_linear_glue.cpp).
//
// Ops (namespace `ompq`, schemas declared here in a TORCH_LIBRARY_FRAGMENT):
//   pack_rows(codes, bits) -> packed
//   unpack_rows(packed, bits, in_features, scale, offset, out) -> ()     (writes out)
//   packed_linear(x, packed, bits, in_features, scale, offset, bias=None) -> y
//
// Layout (docs/DESIGN.md, "Packed runtime layout"): row r holds K = in_features unsigned codes
// u in [0, 2^b - 1], zero-padded to K8 = ceil(K/8)·8; every 8 consecutive codes form one group
// of b bytes, code j of a group at bits [j·b, (j+1)·b) of the little-endian b-byte integer;
// packed is uint8 [rows, K8·b/8]. Weight: w[r, k] = scale[r] · (u[r, k] - offset[r]).
//
// Unpacking. The kernels unpack one *block* of codes at a time into Vectorized<float> registers
// (kW lanes): for b = 8, 4, 2 (byte-aligned) kW bytes are widened to kW int32 lanes and each
// lane's byte yields 8/b codes with shifts and masks (Vectorized<int32_t>), so a block holds
// kW·8/b codes and its vectors are in *lane order*: vector v, lane l holds code (8/b)·l + v.
// For b = 3, 5, 6, 7 one block is kW codes in natural order: a byte shuffle puts the two bytes
// that hold each code into its int32 lane, then a per-lane variable shift and a mask (AVX-512 /
// AVX2; a scalar unpack in portable builds).
//   * packed_linear, batch <= 4 (GEMV): x is permuted once per call into the blocks' lane order
//     (zero beyond K, so pad codes never matter), and each output row accumulates
//     Σ_k x[n,k]·u[r,k] with Vectorized<float> FMAs straight from the unpacked registers
//     (several independent accumulators); the fp32 accumulators are flushed into fp64 every
//     1024 codes, then y[n,r] = scale[r]·(Σ x·u − offset[r]·Σ_k x[n,k]) + bias[r] in fp64
//     (Σ x in fp64). Rows are split over threads (at::parallel_for); the columns are walked in
//     chunks whose x stays in L2. Each row's sum is independent of the thread count.
//   * packed_linear, batch > 4 (tiled): work items of 16 weight rows × up to 256 rows of x; an
//     item unpacks its rows once into a float scratch tile (u − offset, lane order) and
//     multiplies it with its x rows (same order) in a register-tiled dot-product micro-kernel
//     (4 x rows × 4 weight rows of vector accumulators); y = scale·Σ + bias.
//   * unpack_rows: w = (float(u) - offset) · scale in fp32 (bit-identical to the reference),
//     written in natural order into the caller's buffer (at::vec::interleave2 undoes the lane
//     order of b = 2, 4), rows split over threads.
// Loads never run past a row: blocks whose load would cross the row's end are copied into a
// zero-padded stack buffer first.

#include "vec_capability.h"  // first: picks the at::vec implementation

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "packed_checks.h"

namespace ompq {
namespace {

using at::Tensor;
using VF = at::vec::Vectorized<float>;
using VI = at::vec::Vectorized<int32_t>;
constexpr int64_t kW = VF::size();
static_assert(VI::size() == VF::size(), "float and int32 vectors must have the same lane count");

constexpr int64_t kGemvMaxBatch = 4;        // batch rows up to which packed_linear runs the GEMV
constexpr int64_t kFlushCodes = 1024;       // fp32 accumulators flushed into fp64 this often
constexpr int64_t kMinCodesPerTask = 16384; // parallel grain: at least this many codes per task

inline int64_t row_grain(int64_t k) {
  return std::max<int64_t>(1, kMinCodesPerTask / std::max<int64_t>(k, 1));
}

// Little-endian integer of n <= 8 bytes.
inline uint64_t load_le(const uint8_t* p, int n) {
  uint64_t w = 0;
  for (int i = 0; i < n; ++i) w |= static_cast<uint64_t>(p[i]) << (8 * i);
  return w;
}

// Block geometry of width B (see the header comment).
template <int B>
struct Fmt {
  static constexpr bool kAligned = (B == 2 || B == 4 || B == 8);
  static constexpr int64_t kVecs = kAligned ? 8 / B : (kW >= 8 ? 1 : 8 / kW);
  static constexpr int64_t kCodes = kW * kVecs;      // codes per block
  static constexpr int64_t kBytes = kCodes * B / 8;  // bytes per block
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr int64_t kRead = kAligned ? kBytes : 16;  // bytes one block's unpack reads
#elif defined(CPU_CAPABILITY_AVX2)
  static constexpr int64_t kRead = kAligned ? kBytes : 8;
#else
  static constexpr int64_t kRead = kBytes;
#endif
  static constexpr int32_t kMask = (1 << B) - 1;
  // Code (within the block) held by lane l of vector v.
  static constexpr int64_t code_of(int64_t v, int64_t l) {
    return kAligned ? kVecs * l + v : v * kW + l;
  }
  static_assert(kCodes % 8 == 0 || kAligned, "a generic block must hold whole groups");
  static_assert(kRead <= 64, "the tail buffer holds 64 bytes");
};

inline VF to_float(const VI& v) { return at::vec::convert_to_fp_of_same_size<float>(v); }

// kW bytes at p, zero-extended to kW int32 lanes.
inline VI widen_u8(const uint8_t* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return VI(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(CPU_CAPABILITY_AVX2)
  return VI(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  alignas(64) int32_t t[kW];
  for (int64_t l = 0; l < kW; ++l) t[l] = p[l];
  return VI::loadu(t);
#endif
}

// Unpacks one block of width B into Fmt<B>::kVecs float vectors of codes (lane order for the
// byte-aligned widths, natural order for the others). Holds the constant vectors.
template <int B, bool kAligned = Fmt<B>::kAligned>
struct Unpacker;

template <int B>
struct Unpacker<B, true> {
  using F = Fmt<B>;
  const VI mask{F::kMask};
  inline void codes(const uint8_t* p, VF* u) const {
    const VI v = widen_u8(p);
    if constexpr (B == 8) {
      u[0] = to_float(v);
    } else {
      u[0] = to_float(v & mask);
      for (int64_t j = 1; j + 1 < F::kVecs; ++j) u[j] = to_float((v >> VI(int32_t(j * B))) & mask);
      // the top code of a byte needs no mask
      u[F::kVecs - 1] = to_float(v >> VI(int32_t((F::kVecs - 1) * B)));
    }
  }
};

template <int B>
struct Unpacker<B, false> {
  using F = Fmt<B>;
#if defined(CPU_CAPABILITY_AVX512)
  // Lane l (group l / 8, code j = l % 8) takes source bytes s, s + 1 with
  // s = (bit offset) / 8, then shifts right by (bit offset) % 8.
  __m512i ctl, shift, mask;
  Unpacker() {
    alignas(64) int8_t c[64];
    alignas(64) int32_t s[16];
    for (int l = 0; l < 16; ++l) {
      const int bit = (l / 8) * 8 * B + (l % 8) * B;
      c[4 * l] = static_cast<int8_t>(bit / 8);
      c[4 * l + 1] = static_cast<int8_t>(bit / 8 + 1);
      c[4 * l + 2] = c[4 * l + 3] = static_cast<int8_t>(-128);  // zero byte
      s[l] = bit % 8;
    }
    ctl = _mm512_load_si512(c);
    shift = _mm512_load_si512(s);
    mask = _mm512_set1_epi32(F::kMask);
  }
  inline void codes(const uint8_t* p, VF* u) const {
    __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    b = _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(b, ctl), shift), mask);
    u[0] = VF(_mm512_cvtepi32_ps(b));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  __m256i ctl, shift, mask;
  Unpacker() {
    alignas(32) int8_t c[32];
    alignas(32) int32_t s[8];
    for (int l = 0; l < 8; ++l) {
      const int bit = l * B;
      c[4 * l] = static_cast<int8_t>(bit / 8);
      c[4 * l + 1] = static_cast<int8_t>(bit / 8 + 1);
      c[4 * l + 2] = c[4 * l + 3] = static_cast<int8_t>(-128);
      s[l] = bit % 8;
    }
    ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(c));
    shift = _mm256_load_si256(reinterpret_cast<const __m256i*>(s));
    mask = _mm256_set1_epi32(F::kMask);
  }
  inline void codes(const uint8_t* p, VF* u) const {
    __m256i b = _mm256_broadcastsi128_si256(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    b = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(b, ctl), shift), mask);
    u[0] = VF(_mm256_cvtepi32_ps(b));
  }
#else
  inline void codes(const uint8_t* p, VF* u) const {
    alignas(64) float t[F::kCodes];
    for (int64_t g = 0; g < F::kCodes / 8; ++g) {
      const uint64_t w = load_le(p + g * B, B);
      for (int j = 0; j < 8; ++j) t[8 * g + j] = static_cast<float>((w >> (j * B)) & F::kMask);
    }
    for (int64_t v = 0; v < F::kVecs; ++v) u[v] = VF::loadu(t + v * kW);
  }
#endif
};

// The block at `p` with `avail` bytes left in its row: p itself when the unpack's load stays in
// the row, else a zero-padded copy in `pad`.
template <int B>
inline const uint8_t* block_src(const uint8_t* p, int64_t avail, uint8_t* pad) {
  if (avail >= Fmt<B>::kRead) return p;
  std::memset(pad, 0, Fmt<B>::kRead);
  std::memcpy(pad, p, static_cast<size_t>(avail));
  return pad;
}

// Stores the kVecs dequantized vectors of one block (kernel order) in natural code order.
template <int B>
inline void store_natural(const VF* w, float* dst) {
  if constexpr (B == 4) {
    const auto lo_hi = at::vec::interleave2<float>(w[0], w[1]);
    lo_hi.first.store(dst);
    lo_hi.second.store(dst + kW);
  } else if constexpr (B == 2) {
    // w[j] lane l = code 4l + j: evens = interleave(w0, w2), odds = interleave(w1, w3).
    const auto ev = at::vec::interleave2<float>(w[0], w[2]);
    const auto od = at::vec::interleave2<float>(w[1], w[3]);
    const auto a = at::vec::interleave2<float>(ev.first, od.first);
    const auto b = at::vec::interleave2<float>(ev.second, od.second);
    a.first.store(dst);
    a.second.store(dst + kW);
    b.first.store(dst + 2 * kW);
    b.second.store(dst + 3 * kW);
  } else {
    for (int64_t v = 0; v < Fmt<B>::kVecs; ++v) w[v].store(dst + v * kW);
  }
}

// ---------------------------------------------------------------------------------------------
// Dequantization: rows [r0, r1) into dst (row stride ld floats), w = (u - offset) * scale.
// ---------------------------------------------------------------------------------------------
template <int B>
void dequant_rows(const uint8_t* packed, const packed::Geometry& g, const float* scale,
                  const float* offset, int64_t r0, int64_t r1, float* dst, int64_t ld) {
  using F = Fmt<B>;
  const int64_t k = g.k;
  const int64_t fit = g.row_bytes >= F::kRead ? (g.row_bytes - F::kRead) / F::kBytes + 1 : 0;
  const int64_t full = std::min(k / F::kCodes, fit);  // blocks inside K whose load fits
  const int64_t nblocks = (k + F::kCodes - 1) / F::kCodes;
  at::parallel_for(r0, r1, row_grain(k), [&](int64_t begin, int64_t end) {
    const Unpacker<B> un;
    alignas(64) uint8_t pad[64];
    alignas(64) float tmp[F::kCodes];
    for (int64_t r = begin; r < end; ++r) {
      const uint8_t* row = packed + r * g.row_bytes;
      float* out = dst + (r - r0) * ld;
      const VF vs(scale[r]), vo(offset[r]);
      VF u[F::kVecs];
      int64_t blk = 0;
      for (; blk < full; ++blk) {
        un.codes(row + blk * F::kBytes, u);
        for (int64_t v = 0; v < F::kVecs; ++v) u[v] = (u[v] - vo) * vs;
        store_natural<B>(u, out + blk * F::kCodes);
      }
      for (; blk < nblocks; ++blk) {
        const int64_t off = blk * F::kBytes;
        un.codes(block_src<B>(row + off, g.row_bytes - off, pad), u);
        for (int64_t v = 0; v < F::kVecs; ++v) u[v] = (u[v] - vo) * vs;
        store_natural<B>(u, tmp);
        const int64_t k0 = blk * F::kCodes;
        std::memcpy(out + k0, tmp, sizeof(float) * std::min(F::kCodes, k - k0));
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// x in the blocks' lane order: xp [n, kp] with kp = ceil(K / kCodes)·kCodes, zero beyond K.
// ---------------------------------------------------------------------------------------------
template <int B>
int64_t padded_k(int64_t k) {
  return (k + Fmt<B>::kCodes - 1) / Fmt<B>::kCodes * Fmt<B>::kCodes;
}

template <int B>
void permute_x(const float* x, int64_t n, int64_t k, float* xp) {
  using F = Fmt<B>;
  const int64_t kp = padded_k<B>(k);
  at::parallel_for(0, n, std::max<int64_t>(1, kMinCodesPerTask / std::max<int64_t>(kp, 1)),
                   [&](int64_t n0, int64_t n1) {
    for (int64_t i = n0; i < n1; ++i) {
      const float* xr = x + i * k;
      float* dst = xp + i * kp;
      for (int64_t b0 = 0; b0 < kp; b0 += F::kCodes)
        for (int64_t v = 0; v < F::kVecs; ++v)
          for (int64_t l = 0; l < kW; ++l) {
            const int64_t kk = b0 + F::code_of(v, l);
            dst[b0 + v * kW + l] = kk < k ? xr[kk] : 0.f;
          }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// GEMV (batch <= kGemvMaxBatch).
// ---------------------------------------------------------------------------------------------
struct GemvArgs {
  const uint8_t* packed;
  packed::Geometry g;
  const float* xp;     // NB rows of kp floats: x in the blocks' lane order, zero beyond K
  int64_t kp;
  const double* sumx;  // Σ_k x[n, k], fp64
  const float* scale;
  const float* offset;
  const float* bias;   // nullptr: none
  float* y;            // [NB, rows]
};

inline double hsum_double(const VF& s) {
  alignas(64) float t[kW];
  s.store(t);
  double d = 0.0;
  for (int64_t l = 0; l < kW; ++l) d += static_cast<double>(t[l]);
  return d;
}

// d[l] += v[l] in fp64, lane by lane (vectorised by the compiler: no serial chain).
inline void add_lanes(const VF& v, double* d) {
  alignas(64) float t[kW];
  v.store(t);
  for (int64_t l = 0; l < kW; ++l) d[l] += static_cast<double>(t[l]);
}

// Σ d[0..kW) as a fixed pairwise tree (d is overwritten).
inline double tree_sum(double* d) {
  for (int64_t w = kW / 2; w >= 1; w /= 2)
    for (int64_t l = 0; l < w; ++l) d[l] += d[l + w];
  return d[0];
}

// x floats (all NB rows together) of one pass over the rows: 64 KiB, in L2 (smaller chunks,
// in L1, measured slower at K = 4096: more per-row overhead, strided weight reads).
constexpr int64_t kGemvChunkFloats = 16384;

// Σ over blocks [blk, end) of x·u into acc (kAcc = R·U vector chains per batch row). The
// pragmas unroll the constant loops early, so the accumulators stay in registers.
template <int B, int NB, int64_t U>
inline void gemv_span(const Unpacker<B>& un, const uint8_t* row, const float* xp, int64_t kp,
                      int64_t blk, int64_t end, VF (&acc)[NB][Fmt<B>::kVecs * U]) {
  using F = Fmt<B>;
  constexpr int64_t R = F::kVecs;
  VF a[NB][R * U];  // a local copy: kept in registers, not stored back every step
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
    for (int64_t i = 0; i < R * U; ++i) a[n][i] = acc[n][i];
  for (; blk + U <= end; blk += U) {
#pragma GCC unroll 8
    for (int64_t s = 0; s < U; ++s) {
      VF w[R];
      un.codes(row + (blk + s) * F::kBytes, w);
      const float* xb = xp + (blk + s) * F::kCodes;
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
        for (int64_t v = 0; v < R; ++v)
          a[n][s * R + v] =
              at::vec::fmadd(w[v], VF::loadu(xb + n * kp + v * kW), a[n][s * R + v]);
    }
  }
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
    for (int64_t i = 0; i < R * U; ++i) acc[n][i] = a[n][i];
}

template <int B, int NB>
void gemv_rows(const GemvArgs& a, int64_t r0, int64_t r1) {
  using F = Fmt<B>;
  constexpr int64_t R = F::kVecs;
  // Blocks per step: at least 4 independent FMA chains (the FMA latency), at most 16 registers.
  // (U = 1 with one vector per block lets GCC keep the accumulators in memory: use 2.)
  constexpr int64_t U = NB * R >= 4 ? (R == 1 ? 2 : 1) : (NB * R >= 2 ? 2 : 4);
  constexpr int64_t kAcc = R * U;
  constexpr int64_t kFlushBlocks =
      std::max<int64_t>(U, (kFlushCodes / F::kCodes) / U * U);  // a multiple of U
  // Columns are walked in chunks of whole flush intervals whose x (NB rows) stays in L2; each
  // chunk passes over all rows of [r0, r1). Chunk and flush boundaries depend on K only.
  constexpr int64_t kChunkBlocks =
      kFlushBlocks * std::max<int64_t>(1, kGemvChunkFloats / (NB * kFlushBlocks * F::kCodes));
  const packed::Geometry& g = a.g;
  const int64_t nblocks = a.kp / F::kCodes;
  const int64_t fit = g.row_bytes >= F::kRead ? (g.row_bytes - F::kRead) / F::kBytes + 1 : 0;
  const int64_t full = std::min(nblocks, fit);
  const Unpacker<B> un;
  alignas(64) uint8_t pad[64];
  alignas(64) double lanes[NB][kW];
  std::vector<double> tot(static_cast<size_t>((r1 - r0) * NB), 0.0);
  for (int64_t c0 = 0; c0 < nblocks; c0 += kChunkBlocks) {
    const int64_t c1 = std::min(nblocks, c0 + kChunkBlocks);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = a.packed + r * g.row_bytes;
      for (int n = 0; n < NB; ++n)
        for (int64_t l = 0; l < kW; ++l) lanes[n][l] = 0.0;
      for (int64_t blk = c0; blk < c1;) {
        const int64_t end = std::min(c1, blk + kFlushBlocks);
        VF acc[NB][kAcc];
#pragma GCC unroll 8
        for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
          for (int64_t i = 0; i < kAcc; ++i) acc[n][i] = VF(0.f);
        const int64_t fend = std::max(blk, std::min(end, full) / U * U);
        gemv_span<B, NB, U>(un, row, a.xp, a.kp, blk, fend, acc);
        blk = std::max(blk, fend);
        for (; blk < end; ++blk) {  // leftovers of the step, and blocks at the row's end
          const int64_t off = blk * F::kBytes;
          VF w[R];
          un.codes(blk < full ? row + off : block_src<B>(row + off, g.row_bytes - off, pad), w);
          const float* xb = a.xp + blk * F::kCodes;
          for (int n = 0; n < NB; ++n)
            for (int64_t v = 0; v < R; ++v)
              acc[n][v] = at::vec::fmadd(w[v], VF::loadu(xb + n * a.kp + v * kW), acc[n][v]);
        }
        for (int n = 0; n < NB; ++n) {
          VF sum = acc[n][0];
          for (int64_t i = 1; i < kAcc; ++i) sum = sum + acc[n][i];
          add_lanes(sum, lanes[n]);
        }
      }
      double* t = tot.data() + (r - r0) * NB;
      for (int n = 0; n < NB; ++n) t[n] += tree_sum(lanes[n]);
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const double sc = a.scale[r], of = a.offset[r];
    const double bi = a.bias ? static_cast<double>(a.bias[r]) : 0.0;
    const double* t = tot.data() + (r - r0) * NB;
    for (int n = 0; n < NB; ++n) {
      a.y[n * g.rows + r] = static_cast<float>(sc * (t[n] - of * a.sumx[n]) + bi);
    }
  }
}

template <int B>
void gemv(const Tensor& x2d, const Tensor& packed, const packed::Geometry& g, const float* scale,
          const float* offset, const float* bias, float* y) {
  const int64_t nb = x2d.size(0), k = g.k;
  const int64_t kp = padded_k<B>(k);
  std::vector<float> xp(static_cast<size_t>(nb * kp));
  std::vector<double> sumx(static_cast<size_t>(nb));
  const float* x = x2d.const_data_ptr<float>();
  permute_x<B>(x, nb, k, xp.data());
  for (int64_t n = 0; n < nb; ++n) {
    double s = 0.0;
    for (int64_t i = 0; i < k; ++i) s += static_cast<double>(x[n * k + i]);
    sumx[n] = s;
  }
  GemvArgs a{packed.const_data_ptr<uint8_t>(), g, xp.data(), kp, sumx.data(), scale, offset,
             bias, y};
  at::parallel_for(0, g.rows, row_grain(k), [&](int64_t r0, int64_t r1) {
    switch (nb) {
      case 1: gemv_rows<B, 1>(a, r0, r1); break;
      case 2: gemv_rows<B, 2>(a, r0, r1); break;
      case 3: gemv_rows<B, 3>(a, r0, r1); break;
      default: gemv_rows<B, 4>(a, r0, r1); break;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Tiled path (batch > kGemvMaxBatch). Work items are (tile of kTileRows weight rows, chunk of up
// to kTileBatch rows of x). An item unpacks its tile once into a float scratch buffer in the
// blocks' lane order, holding u - offset (exact for integer offsets, so no cancellation), and
// multiplies it with its x rows (permuted to the same order) with a register-tiled dot-product
// micro-kernel: kMR rows of x × kNR weight rows, kMR·kNR vector accumulators over K, then
// y = scale · Σ + bias. Each weight is unpacked once per kTileBatch rows of x.
// ---------------------------------------------------------------------------------------------
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMR = 4;  // 16 accumulators + 4 x + 1 w of 32 registers
#else
constexpr int kMR = 2;  // 8 accumulators + 2 x + 1 w of 16 registers
#endif
constexpr int kNR = 4;
constexpr int64_t kTileRows = 16;    // weight rows per tile (a multiple of kNR)
constexpr int64_t kTileBatch = 256;  // x rows per work item
static_assert(kTileRows % kNR == 0, "tiles hold whole micro-tiles");

template <int MR>
void dot_tile(const float* x, const float* w, int64_t kp, double* out) {
  VF acc[MR][kNR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) acc[i][j] = VF(0.f);
  for (int64_t k = 0; k < kp; k += kW) {
    VF xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = VF::loadu(x + i * kp + k);
    for (int j = 0; j < kNR; ++j) {
      const VF wv = VF::loadu(w + j * kp + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = at::vec::fmadd(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kNR; ++j) out[i * kNR + j] = hsum_double(acc[i][j]);
}

using DotFn = void (*)(const float*, const float*, int64_t, double*);

template <int B>
void tiled(const Tensor& x2d, const Tensor& packed, const packed::Geometry& g, const float* scale,
           const float* offset, const float* bias, float* y) {
  using F = Fmt<B>;
  static const DotFn kDot[4] = {&dot_tile<1>, &dot_tile<std::min(2, kMR)>,
                                &dot_tile<std::min(3, kMR)>, &dot_tile<kMR>};
  const int64_t n = x2d.size(0), k = g.k, kp = padded_k<B>(k);
  std::vector<float> xp(static_cast<size_t>(n * kp));
  permute_x<B>(x2d.const_data_ptr<float>(), n, k, xp.data());
  const int64_t ntiles = (g.rows + kTileRows - 1) / kTileRows;
  const int64_t nchunks = (n + kTileBatch - 1) / kTileBatch;
  const int64_t nblocks = kp / F::kCodes;
  const int64_t fit = g.row_bytes >= F::kRead ? (g.row_bytes - F::kRead) / F::kBytes + 1 : 0;
  const int64_t full = std::min(nblocks, fit);
  const uint8_t* p = packed.const_data_ptr<uint8_t>();
  at::parallel_for(0, ntiles * nchunks, 1, [&](int64_t item0, int64_t item1) {
    const Unpacker<B> un;
    alignas(64) uint8_t pad[64];
    std::vector<float> wt(static_cast<size_t>(kTileRows * kp));
    for (int64_t item = item0; item < item1; ++item) {
      const int64_t r0 = (item / nchunks) * kTileRows;
      const int64_t nr = std::min(kTileRows, g.rows - r0);
      const int64_t b0 = (item % nchunks) * kTileBatch;
      const int64_t nbat = std::min(kTileBatch, n - b0);
      for (int64_t i = 0; i < kTileRows; ++i) {
        float* dst = wt.data() + i * kp;
        if (i >= nr) {
          std::fill(dst, dst + kp, 0.f);
          continue;
        }
        const uint8_t* row = p + (r0 + i) * g.row_bytes;
        const VF vo(offset[r0 + i]);
        VF u[F::kVecs];
        for (int64_t blk = 0; blk < nblocks; ++blk) {
          const int64_t off = blk * F::kBytes;
          un.codes(blk < full ? row + off : block_src<B>(row + off, g.row_bytes - off, pad), u);
          for (int64_t v = 0; v < F::kVecs; ++v)
            (u[v] - vo).store(dst + blk * F::kCodes + v * kW);
        }
      }
      double sums[kMR * kNR];
      for (int64_t m0 = 0; m0 < nbat; m0 += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, nbat - m0));
        const float* xr = xp.data() + (b0 + m0) * kp;
        for (int64_t j0 = 0; j0 < nr; j0 += kNR) {
          kDot[mr - 1](xr, wt.data() + j0 * kp, kp, sums);
          for (int i = 0; i < mr; ++i) {
            float* yr = y + (b0 + m0 + i) * g.rows;
            for (int64_t j = 0; j < std::min<int64_t>(kNR, nr - j0); ++j) {
              const int64_t r = r0 + j0 + j;
              const double b = bias ? static_cast<double>(bias[r]) : 0.0;
              yr[r] = static_cast<float>(static_cast<double>(scale[r]) * sums[i * kNR + j] + b);
            }
          }
        }
      }
    }
  });
}

#define OMPQ_DISPATCH_BITS(bits, FN, ...)                   \
  switch (bits) {                                           \
    case 2: FN<2>(__VA_ARGS__); break;                      \
    case 3: FN<3>(__VA_ARGS__); break;                      \
    case 4: FN<4>(__VA_ARGS__); break;                      \
    case 5: FN<5>(__VA_ARGS__); break;                      \
    case 6: FN<6>(__VA_ARGS__); break;                      \
    case 7: FN<7>(__VA_ARGS__); break;                      \
    default: FN<8>(__VA_ARGS__); break;                     \
  }

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

Tensor pack_rows_cpu(const Tensor& codes_in, int64_t bits) {
  packed::check_codes("pack_rows", codes_in, bits);
  const Tensor codes = codes_in.contiguous();
  const int64_t rows = codes.size(0), k = codes.size(1);
  const int64_t rb = packed::row_bytes_for(k, bits);
  Tensor out = at::empty({rows, rb}, codes.options().dtype(at::kByte));
  const int64_t maxv = (int64_t(1) << bits) - 1;
  const int64_t groups = (k + 7) / 8;
  std::vector<int64_t> bad_col(static_cast<size_t>(rows), -1);  // first bad column per row
  uint8_t* o = out.mutable_data_ptr<uint8_t>();
  AT_DISPATCH_INTEGRAL_TYPES(codes.scalar_type(), "pack_rows", [&] {
    const scalar_t* c = codes.const_data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(k), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* cr = c + r * k;
        uint8_t* orow = o + r * rb;
        for (int64_t gi = 0; gi < groups; ++gi) {
          uint64_t w = 0;
          for (int64_t j = 0; j < 8; ++j) {
            const int64_t kk = gi * 8 + j;
            if (kk >= k) break;
            const int64_t v = static_cast<int64_t>(cr[kk]);
            if (v < 0 || v > maxv) {
              if (bad_col[r] < 0) bad_col[r] = kk;
              continue;
            }
            w |= static_cast<uint64_t>(v) << (j * bits);
          }
          for (int64_t i = 0; i < bits; ++i)
            orow[gi * bits + i] = static_cast<uint8_t>(w >> (8 * i));
        }
      }
    });
  });
  for (int64_t r = 0; r < rows; ++r) {
    if (bad_col[r] >= 0) {
      const int64_t v = codes[r][bad_col[r]].item<int64_t>();
      TORCH_CHECK_VALUE(false, "ompq.pack_rows: codes must lie in [0, ", maxv, "] for ", bits,
                        " bits (u = q - qmin), got ", v, " at [", r, ", ", bad_col[r], "]");
    }
  }
  return out;
}

void unpack_rows_cpu(const Tensor& packed_in, int64_t bits, int64_t in_features,
                     const Tensor& scale_in, const Tensor& offset_in, const Tensor& out) {
  const packed::Geometry g =
      packed::check_packed("unpack_rows", packed_in, bits, in_features, scale_in, offset_in);
  packed::check_out("unpack_rows", out, g, packed_in);
  if (g.rows == 0 || g.k == 0) return;
  const Tensor scale = scale_in.reshape({-1}).contiguous();
  const Tensor offset = offset_in.reshape({-1}).contiguous();
  OMPQ_DISPATCH_BITS(g.bits, dequant_rows, packed_in.const_data_ptr<uint8_t>(), g,
                     scale.const_data_ptr<float>(), offset.const_data_ptr<float>(), 0, g.rows,
                     out.mutable_data_ptr<float>(), g.k)
}

Tensor packed_linear_cpu(const Tensor& x_in, const Tensor& packed_in, int64_t bits,
                         int64_t in_features, const Tensor& scale_in, const Tensor& offset_in,
                         const c10::optional<Tensor>& bias_in) {
  const char* op = "packed_linear";
  const packed::Geometry g = packed::check_linear(op, x_in, packed_in, bits, in_features,
                                                   scale_in, offset_in, bias_in);
  int64_t batch = 1;
  const std::vector<int64_t> out_shape = packed::linear_out_shape(x_in, g, batch);
  const Tensor x2d = x_in.reshape({batch, g.k}).contiguous();
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const Tensor bias = has_bias ? bias_in->reshape({-1}).contiguous() : Tensor();
  if (x2d.size(0) == 0 || g.rows == 0) return at::empty(out_shape, x_in.options());
  if (g.k == 0) {
    Tensor y = at::zeros({x2d.size(0), g.rows}, x_in.options());
    if (has_bias) y.add_(bias);
    return y.reshape(out_shape);
  }
  const Tensor scale = scale_in.reshape({-1}).contiguous();
  const Tensor offset = offset_in.reshape({-1}).contiguous();
  const float* sp = scale.const_data_ptr<float>();
  const float* op_ = offset.const_data_ptr<float>();
  const int64_t n = x2d.size(0);
  if (n <= kGemvMaxBatch) {
    Tensor y = at::empty({n, g.rows}, x_in.options());
    const float* bp = has_bias ? bias.const_data_ptr<float>() : nullptr;
    OMPQ_DISPATCH_BITS(g.bits, gemv, x2d, packed_in, g, sp, op_, bp, y.mutable_data_ptr<float>())
    return y.reshape(out_shape);
  }
  Tensor y = at::empty({n, g.rows}, x_in.options());
  const float* bp = has_bias ? bias.const_data_ptr<float>() : nullptr;
  OMPQ_DISPATCH_BITS(g.bits, tiled, x2d, packed_in, g, sp, op_, bp, y.mutable_data_ptr<float>())
  return y.reshape(out_shape);
}

#undef OMPQ_DISPATCH_BITS

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_FRAGMENT(ompq, m) {
  m.def("pack_rows(Tensor codes, int bits) -> Tensor");
  m.def("unpack_rows(Tensor packed, int bits, int in_features, Tensor scale, Tensor offset, "
        "Tensor(a!) out) -> ()");
  m.def("packed_linear(Tensor x, Tensor packed, int bits, int in_features, Tensor scale, "
        "Tensor offset, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(ompq, CPU, m) {
  m.impl("pack_rows", &ompq::pack_rows_cpu);
  m.impl("unpack_rows", &ompq::unpack_rows_cpu);
  m.impl("packed_linear", &ompq::packed_linear_cpu);
}
