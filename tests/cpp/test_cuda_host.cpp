// Host-side test of the CUDA kernels' shared code, runnable without a GPU: the per-element math
// (csrc/cuda/kernel_math.h) is evaluated on the CPU and compared with the CPU ops (bitwise where
// the CPU promises it), and the work partition / reduction order (csrc/cuda/kernel_plan.h) is
// enumerated to check that every element is covered exactly once, that every partial sum is
// written once and finalised once, and that the Gram's fp32->fp64 flush meets 1e-5 relative
// accuracy at N = 64, D = 200 000. Run by ctest (scripts/cpp_tests.sh).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iostream>
#include <limits>
#include <vector>

#include "cuda/kernel_math.h"
#include "cuda/kernel_plan.h"
#include "expect.h"

namespace {

using at::Tensor;
using Stack = std::vector<c10::IValue>;
namespace km = ompq::kmath;
namespace pl = ompq::plan;

Stack call(const char* name, Stack args) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&args);
  return args;
}

template <typename T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0 || (std::isnan(a) && std::isnan(b));
}

// Sums equal up to summation order (equal infinities, both NaN).
bool close_sum(double a, double b) {
  if (a == b || (std::isnan(a) && std::isnan(b))) return true;
  return std::abs(a - b) <= 1e-4 * (1 + std::abs(b));
}

// x with near-ties, NaN, +-Inf, huge values.
Tensor input(std::vector<int64_t> shape, at::ScalarType dt, uint64_t seed) {
  at::manual_seed(seed);
  Tensor x = at::randn(shape, at::kDouble) * 1.7;
  double* p = x.data_ptr<double>();
  for (int64_t i = 0; i < x.numel(); i += 5) p[i] = std::round(p[i] * 10) / 10 + 0.05;
  if (x.numel() > 12) {
    p[1] = std::numeric_limits<double>::quiet_NaN();
    p[3] = std::numeric_limits<double>::infinity();
    p[5] = -std::numeric_limits<double>::infinity();
    p[11] = 1e30;
  }
  return x.to(dt);
}

template <typename T>
void test_fq_math(std::vector<int64_t> shape, int64_t axis, at::ScalarType dt) {
  const int64_t dim = shape.size();
  const int64_t ax = axis < 0 ? axis + dim : axis;
  const bool per_tensor = axis == -100;
  Tensor x = input(shape, dt, 1 + shape.size()), g = input(shape, dt, 7) * 0.5;
  const int64_t C = per_tensor ? 1 : shape[ax];
  int64_t inner = 1;
  if (!per_tensor)
    for (int64_t d = ax + 1; d < dim; ++d) inner *= shape[d];
  else
    inner = x.numel();
  Tensor s = at::rand({C}) * 0.3 + 0.05, z = at::randint(-3, 9, {C}).to(at::kFloat);
  Tensor zl = z + 0.4;  // LSQ rounds it
  const int64_t qmin = -4, qmax = 11;
  c10::IValue ax_iv = per_tensor ? c10::IValue() : c10::IValue(axis);
  Tensor y = call("ompq::fake_quant", {x, s, z, qmin, qmax, ax_iv})[0].toTensor();
  Tensor gx = call("ompq::fake_quant_backward", {g, x, s, z, qmin, qmax, ax_iv})[0].toTensor();
  Tensor yl = call("ompq::lsq_fake_quant", {x, s, zl, qmin, qmax, ax_iv, 0.37})[0].toTensor();
  Stack lb = call("ompq::lsq_fake_quant_backward", {g, x, s, zl, qmin, qmax, ax_iv, 0.37});
  Tensor lgx = lb[0].toTensor(), lgs = lb[1].toTensor(), lgz = lb[2].toTensor();
  const T* xp = x.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  const T* yp = y.data_ptr<T>();
  const T* gxp = gx.data_ptr<T>();
  const T* ylp = yl.data_ptr<T>();
  const T* lgxp = lgx.data_ptr<T>();
  // Per-channel coefficients of fake_quant (k) and lsq_fake_quant (kl), built once.
  const float* sp = s.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  const float* zlp = zl.data_ptr<float>();
  std::vector<km::FqCoef<T>> k, kl;
  for (int64_t c = 0; c < C; ++c) {
    k.push_back(km::make_fq_coef<T>(sp[c], zp[c], qmin, qmax, false, 1.0f));
    kl.push_back(km::make_fq_coef<T>(sp[c], zlp[c], qmin, qmax, true, 0.37f));
  }
  std::vector<double> ss(C, 0.0), sz(C, 0.0);
  int bad_y = 0, bad_gx = 0, bad_yl = 0, bad_lgx = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const int64_t c = (i / inner) % C;
    bad_y += !same_bits(km::fq_forward<T>(xp[i], k[c]), yp[i]);
    bad_gx += !same_bits(km::fq_backward<T>(gp[i], xp[i], k[c]), gxp[i]);
    bad_yl += !same_bits(km::fq_forward<T>(xp[i], kl[c]), ylp[i]);
    T a, b;
    bad_lgx += !same_bits(km::lsq_backward<T>(gp[i], xp[i], kl[c], &a, &b), lgxp[i]);
    ss[c] += a;
    sz[c] += b;
  }
  EXPECT(bad_y == 0 && bad_gx == 0 && bad_yl == 0 && bad_lgx == 0,
         "fq math differs from the CPU ops: y " << bad_y << " gx " << bad_gx << " lsq y "
                                                << bad_yl << " lsq gx " << bad_lgx);
  for (int64_t c = 0; c < C; ++c) {
    const double es = lgs[c].item<double>(), ez = lgz[c].item<double>();
    EXPECT(close_sum(ss[c], es), "grad_scale " << ss[c] << " vs " << es);
    EXPECT(close_sum(sz[c], ez), "grad_zp " << sz[c] << " vs " << ez);
  }
}

void test_fq_params() {
  EXPECT(km::fq_params_ok(0.1f, 3.f, 0, 15, false), "valid params rejected");
  EXPECT(!km::fq_params_ok(-0.1f, 3.f, 0, 15, false), "negative scale");
  EXPECT(!km::fq_params_ok(0.f, 3.f, 0, 15, false), "zero scale");
  EXPECT(!km::fq_params_ok(NAN, 3.f, 0, 15, true), "nan scale");
  EXPECT(!km::fq_params_ok(INFINITY, 3.f, 0, 15, true), "inf scale");
  EXPECT(!km::fq_params_ok(1e-45f, 3.f, 0, 15, true), "inverse overflows");
  EXPECT(km::fq_params_ok(3e-39f, 3.f, 0, 15, true), "denormal scale with finite inverse");
  EXPECT(!km::fq_params_ok(0.1f, NAN, 0, 15, true), "nan zp");
  EXPECT(!km::fq_params_ok(0.1f, 20.f, 0, 15, false), "zp out of range (fake_quant)");
  EXPECT(km::fq_params_ok(0.1f, 20.f, 0, 15, true), "zp out of range is clamped (lsq)");
}

template <typename T>
void test_ada_math(bool soft, int64_t axis) {
  at::ScalarType dt = std::is_same<T, float>::value ? at::kFloat : at::kDouble;
  Tensor w = input({6, 5, 7}, dt, 3), v = input({6, 5, 7}, dt, 4) * 2, g = input({6, 5, 7}, dt, 5);
  const int64_t C = axis < 0 ? 1 : w.size(axis);
  int64_t inner = 1;
  if (axis >= 0)
    for (int64_t d = axis + 1; d < 3; ++d) inner *= w.size(d);
  else
    inner = w.numel();
  Tensor s = (at::rand({C}) * 0.3 + 0.05).to(dt), z = at::randint(0, 5, {C}).to(dt);
  c10::IValue ax = axis < 0 ? c10::IValue() : c10::IValue(axis);
  Tensor y = call("ompq::adaround_fake_quant", {w, s, z, v, 0, 15, ax, soft})[0].toTensor();
  Stack b = call("ompq::adaround_fake_quant_backward", {g, w, s, z, v, 0, 15, ax, soft});
  const T* sp = s.data_ptr<T>();
  const T* zp = z.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  const T* yp = y.data_ptr<T>();
  const Tensor bgw = b[0].toTensor(), bgv = b[1].toTensor();
  const T* gwp = bgw.data_ptr<T>();
  const T* gvp = bgv.data_ptr<T>();
  double max_rel = 0;
  int bad = 0;
  for (int64_t i = 0; i < w.numel(); ++i) {
    const int64_t c = (i / inner) % C;
    const T sc = sp[c], zc = zp[c];
    const T yi = km::ada_forward<T>(wp[i], vp[i], sc, zc, T(0), T(15), soft);
    T gw, gv;
    km::ada_backward<T>(gp[i], wp[i], vp[i], sc, zc, T(0), T(15), soft, &gw, &gv);
    const T ey = yp[i], egw = gwp[i], egv = gvp[i];
    if (!soft) {
      bad += !same_bits(yi, ey) + !same_bits(gw, egw) + !same_bits(gv, egv);
    } else {
      // exp differs in the last bits: y may move by one step near a floor boundary; gv close.
      bad += std::isnan(yi) != std::isnan(ey) || std::isnan(gv) != std::isnan(egv);
      if (!std::isnan(gv) && !std::isnan(egv))
        max_rel = std::max(max_rel, double(std::abs(gv - egv)) / (1e-6 + std::abs(double(egv))));
    }
  }
  EXPECT(bad == 0, "adaround math differs from the CPU ops (soft " << soft << "): " << bad);
  EXPECT(max_rel < 1e-4, "adaround soft gv relative error " << max_rel);
}

// One finalise level exactly as lsq_finalize_kernel runs it: block b -> (c, [m0, m1)), thread t
// adds its cursor's slots in order, then the fixed tree. Counts the reads of every slot.
std::vector<double> emulate_level(const pl::FinMap& f, int64_t chunks, int64_t C,
                                  const std::vector<double>& part, std::vector<int>* read) {
  std::vector<double> out(C * chunks, 0.0);
  int64_t bad_cursor = 0;
  for (int64_t b = 0; b < C * chunks; ++b) {
    int64_t c, m0, m1;
    pl::fin_block(b, chunks, f.M, &c, &m0, &m1);
    std::vector<double> sh(pl::kFinThreads, 0.0);
    for (int t = 0; t < pl::kFinThreads; ++t) {
      int64_t expect_m = m0 + t;
      for (pl::FinCursor cur = pl::fin_cursor(f, c, m0, m1, t); cur.m < cur.end;
           pl::fin_next(f, &cur)) {
        // The incremental slot equals the closed form slot(c, m).
        const int64_t closed = c * f.cstride + (cur.m / f.S) * f.ustride + cur.m % f.S;
        bad_cursor += !(cur.m == expect_m && cur.slot == closed && cur.seg == cur.m % f.S &&
                        pl::fin_slot(f, c, cur.m) == closed);
        expect_m += pl::kFinThreads;
        ++(*read)[cur.slot];
        sh[t] += part[cur.slot];
      }
    }
    pl::fin_tree_steps([&](int off) {
      for (int t = 0; t < off; ++t) sh[t] += sh[t + off];
    });
    out[b] = sh[0];
  }
  EXPECT(bad_cursor == 0, "finalise cursor: " << bad_cursor << " slots differ from the closed form "
                                               "(M=" << f.M << " S=" << f.S << ")");
  return out;
}

// lsq_finalize_warp_kernel (M <= kWarp): warp c, lane l reads partial l, then the fixed
// shuffle tree (v += v[l + off] for off = 16, ..., 1; the sum ends in lane 0).
std::vector<double> emulate_warp_finalise(const pl::FinMap& f, int64_t C,
                                          const std::vector<double>& part,
                                          std::vector<int>* read) {
  std::vector<double> out(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    double lane[pl::kWarp] = {};
    for (int l = 0; l < pl::kWarp; ++l) {
      if (l < f.M) {
        const int64_t slot = pl::fin_slot(f, c, l);
        ++(*read)[slot];
        lane[l] = part[slot];
      }
    }
    for (int off = pl::kWarp / 2; off > 0; off /= 2) {
      for (int l = 0; l + off < pl::kWarp; ++l) lane[l] += lane[l + off];
    }
    out[c] = lane[0];
  }
  return out;
}

// The whole LSQ finalise (one warp per channel when M <= kWarp, else one level, or two when
// M > kFinChunk); returns the C channel sums.
std::vector<double> emulate_finalise(const pl::RowPlan& p, const std::vector<double>& part,
                                     std::vector<int>* read) {
  const pl::FinMap f = pl::row_fin_map(p);
  if (pl::fin_by_warp(f.M)) return emulate_warp_finalise(f, p.channels, part, read);
  const int64_t chunks = pl::fin_chunks(f.M);
  if (chunks == 1) return emulate_level(f, 1, p.channels, part, read);
  const std::vector<double> l2 = emulate_level(f, chunks, p.channels, part, read);
  std::vector<int> read2(l2.size(), 0);
  std::vector<double> out = emulate_level(pl::chunk_fin_map(chunks), 1, p.channels, l2, &read2);
  int bad = 0;
  for (int r : read2) bad += r != 1;
  EXPECT(bad == 0 && pl::lsq_scratch_doubles(p) ==
                         2 * pl::partial_slots(p) + 2 * p.channels * chunks,
         "level-2 partials read " << bad << " times wrong");
  return out;
}

// Finalise alone on large shapes (partials synthetic, no element walk): every slot read once,
// sums equal the direct per-channel sums over slot_of(u, c, seg).
void test_finalise(int64_t outer, int64_t C, int64_t inner, bool expect_two_levels) {
  const pl::RowPlan p = pl::make_row_plan(outer, C, inner);
  const int64_t slots = pl::partial_slots(p);
  std::vector<double> part(slots);
  for (int64_t i = 0; i < slots; ++i) part[i] = std::sin(double(i)) + 1.5;
  std::vector<int> read(slots, 0);
  const std::vector<double> fin = emulate_finalise(p, part, &read);
  int64_t bad_read = 0;
  for (int r : read) bad_read += r != 1;
  double max_err = 0;
  for (int64_t c = 0; c < C; ++c) {
    double d = 0;
    for (int64_t u = 0; u < p.U; ++u)
      for (int64_t seg = 0; seg < p.segs; ++seg) d += part[pl::slot_of(p, u, c, seg)];
    max_err = std::max(max_err, std::abs(fin[c] - d) / (1 + std::abs(d)));
  }
  const bool two = pl::fin_chunks(pl::row_fin_map(p).M) > 1;
  EXPECT(bad_read == 0 && max_err < 1e-12 && two == expect_two_levels,
         "finalise outer=" << outer << " C=" << C << " inner=" << inner << ": slots read wrong "
                           << bad_read << ", err " << max_err << ", two levels " << two);
}

// Long-row pack split: head and tail shorter than N, body made of aligned whole packs, every
// element of [b, e) in exactly one part, for every alignment shift.
void test_pack_split() {
  int bad = 0;
  for (int64_t N : {2, 4, 8})
    for (int64_t shift = 0; shift < N; ++shift)
      for (int64_t b : {0, 1, 3, 5, 1024, 4097})
        for (int64_t len : {0, 1, 2, 3, 7, 8, 9, 31, 1024}) {
          const int64_t e = b + len;
          int64_t hb, ve;
          pl::pack_split(b, e, shift, N, &hb, &ve);
          bad += !(b <= hb && hb <= ve && ve <= e && hb - b < N && e - ve < N &&
                   (ve - hb) % N == 0 && (hb == ve || (hb + shift) % N == 0) &&
                   (hb == e || (hb + shift) % N == 0));
        }
  EXPECT(bad == 0, "pack_split: " << bad << " bad splits");
}

// Every element exactly once, with the right channel; partial slots written once each and
// read once each by the finalise; emulated reduction equals the direct per-channel sum.
void test_row_plan(int64_t outer, int64_t C, int64_t inner) {
  const pl::RowPlan p = pl::make_row_plan(outer, C, inner);
  const int64_t n = outer * C * inner;
  std::vector<int> seen(n, 0), written(pl::partial_slots(p), 0), read(pl::partial_slots(p), 0);
  std::vector<double> part(pl::partial_slots(p), 0.0);
  auto val = [](int64_t i) { return std::sin(double(i)) + 1.0; };
  bool chan_ok = true;
  if (p.long_rows) {
    for (int64_t item = 0; item < p.items; ++item) {
      int64_t c, b, e;
      pl::long_item(p, item, &c, &b, &e);
      double s = 0;
      for (int64_t i = b; i < e; ++i) {
        ++seen[i];
        chan_ok &= (i / inner) % C == c;
        s += val(i);
      }
      ++written[item];
      part[item] = s;
    }
  } else {
    for (int64_t tile = 0; tile < p.tiles; ++tile) {
      std::vector<double> sh(pl::kBlock, 0.0);
      int64_t group = -1, otile = -1;  // the tile's, from short_thread (set for every t)
      for (int t = 0; t < pl::kBlock; ++t) {
        pl::ShortThread st;
        const bool has_column = pl::short_thread(p, tile, t, &st);
        chan_ok &= t == 0 || (st.group == group && st.otile == otile);
        group = st.group;
        otile = st.otile;
        if (!has_column) continue;
        // The kernels' walk: short_iters(p, st) elements base, base + step, ...
        const int64_t iters = pl::short_iters(p, st);
        chan_ok &= iters <= pl::kIters && (iters == 0 || st.o0 + (iters - 1) * p.rpi < outer) &&
                   (iters == pl::kIters || st.o0 + iters * p.rpi >= outer);
        for (int64_t it = 0, i = st.base; it < iters; ++it, i += st.step) {
          ++seen[i];
          chan_ok &= (i / inner) % C == st.c;
          sh[t] += val(i);
        }
      }
      for (int t = 0; t < p.kc; ++t) {
        const int64_t c = group * p.kc + t;
        if (c >= C) continue;
        double s = 0;
        for (int64_t ph = 0; ph < p.rpi; ++ph)
          for (int64_t e = 0; e < inner; ++e) s += sh[ph * p.width + t * inner + e];
        const int64_t slot = pl::slot_of(p, otile, c, 0);
        ++written[slot];
        part[slot] = s;
      }
    }
  }
  int64_t bad_seen = 0, bad_written = 0, bad_read = 0;
  for (int64_t i = 0; i < n; ++i) bad_seen += seen[i] != 1;
  for (int w : written) bad_written += w != 1;
  std::vector<double> direct(C, 0.0);
  for (int64_t i = 0; i < n; ++i) direct[(i / inner) % C] += val(i);
  const std::vector<double> fin = emulate_finalise(p, part, &read);
  double max_err = 0;
  for (int64_t c = 0; c < C; ++c)
    max_err = std::max(max_err, std::abs(fin[c] - direct[c]) / (1 + std::abs(direct[c])));
  for (int r : read) bad_read += r != 1;
  EXPECT(bad_seen == 0 && chan_ok && bad_written == 0 && bad_read == 0 && max_err < 1e-12,
         "row plan outer=" << outer << " C=" << C << " inner=" << inner << ": elements not once "
                           << bad_seen << ", channel ok " << chan_ok << ", slots written "
                           << bad_written << " read " << bad_read << ", err " << max_err);
}

void test_gram_plan(int64_t n, int64_t d) {
  const pl::GramPlan g = pl::make_gram_plan(n, d);
  EXPECT(g.slice % pl::kGFlush == 0 && g.slices * g.slice >= d && (g.slices - 1) * g.slice < d,
         "gram slices n=" << n << " d=" << d);
  std::vector<int> pair_seen(g.tiles * g.tiles, 0);
  for (int64_t p = 0; p < g.pairs; ++p) {
    int64_t bi, bj;
    pl::gram_pair(g, p, &bi, &bj);
    EXPECT(bi <= bj && bj < g.tiles && pl::gram_pair_index(g, bi, bj) == p, "gram pair " << p);
    ++pair_seen[bi * g.tiles + bj];
  }
  for (int64_t bi = 0; bi < g.tiles; ++bi)
    for (int64_t bj = bi; bj < g.tiles; ++bj)
      EXPECT(pair_seen[bi * g.tiles + bj] == 1, "tile pair " << bi << "," << bj);
  // Every partial index read by the finalise lies in its (pair, slice) tile, distinct per slice.
  const int64_t total = g.pairs * g.slices * pl::kGTile * pl::kGTile;
  int bad = 0;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t s = 0; s < g.slices; ++s) {
        const int64_t idx = pl::gram_partial_index(g, i, j, s);
        const int64_t a = std::min(i, j), b = std::max(i, j);
        const int64_t p = pl::gram_pair_index(g, a / pl::kGTile, b / pl::kGTile);
        bad += idx < 0 || idx >= total ||
               idx != ((p * g.slices + s) * pl::kGTile + a % pl::kGTile) * pl::kGTile +
                          b % pl::kGTile ||
               idx != pl::gram_partial_index(g, j, i, s) ||
               idx != pl::gram_partial_index(g, i, j, 0) + s * pl::kGSliceStride;
      }
  EXPECT(bad == 0, "gram partial index n=" << n << " d=" << d);
}

// Emulates the Gram kernel's arithmetic (fp64 column means, fp32 centring, fp32 FMA chains of
// kGFlush columns flushed into fp64, fp64 slice sum) for N = 64, D = 200 000 post-ReLU-like data
// with a large mean and checks 1e-5 relative accuracy against fp64.
void test_gram_accuracy() {
  const int64_t n = 64, d = 200000;
  at::manual_seed(0);
  Tensor x = (at::relu(at::randn({n, d})) * 3 + 5).contiguous();
  const float* xp = x.data_ptr<float>();
  std::vector<float> mean(d), xc(n * d);
  std::vector<double> xd(n * d);
  for (int64_t k = 0; k < d; ++k) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += xp[i * d + k];
    mean[k] = static_cast<float>(s / n);
    for (int64_t i = 0; i < n; ++i) {
      xc[i * d + k] = xp[i * d + k] - mean[k];
      xd[i * d + k] = xp[i * d + k] - s / n;
    }
  }
  const pl::GramPlan g = pl::make_gram_plan(n, d);
  double max_err = 0, max_ref = 0;
  for (int64_t i = 0; i < n; i += 3)
    for (int64_t j = i; j < n; j += 5) {
      double total = 0, ref = 0;
      for (int64_t s = 0; s < g.slices; ++s) {
        double dacc = 0;
        float acc = 0;
        const int64_t k1 = std::min(d, (s + 1) * g.slice);
        for (int64_t k = s * g.slice, c = 0; k < k1; ++k) {
          acc = std::fma(xc[i * d + k], xc[j * d + k], acc);
          if (++c == pl::kGFlush) dacc += acc, acc = 0, c = 0;
        }
        total += dacc + acc;
      }
      for (int64_t k = 0; k < d; ++k) ref += xd[i * d + k] * xd[j * d + k];
      max_err = std::max(max_err, std::abs(static_cast<float>(total) - ref));
      max_ref = std::max(max_ref, std::abs(ref));
    }
  std::cout << "gram emulation N=64 D=200000: max |err| / max |G| = " << max_err / max_ref
            << std::endl;
  EXPECT(max_err / max_ref < 1e-5, "gram accuracy " << max_err / max_ref);
}

}  // namespace

int main() {
  test_fq_params();
  for (auto dt : {at::kFloat, at::kDouble}) {
    auto run = [&](std::vector<int64_t> shape, int64_t axis) {
      if (dt == at::kFloat) test_fq_math<float>(shape, axis, dt);
      else test_fq_math<double>(shape, axis, dt);
    };
    run({4, 9, 37}, -100);
    run({4, 9, 37}, 0);
    run({4, 9, 37}, 1);
    run({4, 9, 37}, -1);
    run({3, 5, 300}, 1);
  }
  for (bool soft : {false, true})
    for (int64_t axis : {-1, 0, 2}) {
      test_ada_math<float>(soft, axis);
      test_ada_math<double>(soft, axis);
    }
  const int64_t shapes[][3] = {{1, 1, 1},     {1, 1, 255},   {1, 1, 256},  {1, 1, 5000},
                               {7, 3, 1},     {100, 3, 1},   {3, 70000, 1}, {2, 300, 9},
                               {33, 17, 129}, {5, 4, 256},   {2, 3, 2049}, {1000, 1, 3},
                               {65, 257, 1},  {4, 1, 100000}, {9, 2, 128}};
  for (const auto& s : shapes) test_row_plan(s[0], s[1], s[2]);
  // Two-level finalise, walked element by element: per-tensor 4M (segs = 977, U = 4) and
  // segs = 2 partials per row (the cursor's wrap) with M = 3000.
  test_row_plan(4, 1, 1000000);
  test_row_plan(1500, 2, 1100);
  // Finalise alone: one level at the boundary, two levels for long and short rows.
  test_finalise(1, 1, 2048 * 1024, false);
  test_finalise(1, 1, 2048 * 1024 + 1, true);
  test_finalise(64 * 64, 1, 56 * 56, true);     // the activation tensor, per-channel-like rows
  test_finalise(1, 1, 64 * 64 * 56 * 56, true);  // the activation tensor, per tensor
  test_finalise(512, 512, 9, false);             // the weight tensor, per channel (short rows)
  test_finalise(3, 300, 700000, true);            // segs = 684, M = 2052: just two levels
  test_finalise(70000, 1, 1, false);
  test_finalise(20000000, 3, 1, true);           // short rows, 7354 outer tiles
  test_finalise(700000, 256, 1, true);           // short rows, kc = 256, rpi = 1
  test_pack_split();
  for (int64_t n : {2, 63, 64, 65, 130})
    for (int64_t d : {1, 31, 33, 1000, 70000}) test_gram_plan(n, d);
  test_gram_accuracy();
  return ompq_test::finish();
}
