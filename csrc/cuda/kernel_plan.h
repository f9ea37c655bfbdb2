// Work partition of the CUDA kernels (which warp/thread covers which elements, where partial
// sums go and in which order they are finalised). __host__ __device__ so the host-side test
// (tests/cpp/test_cuda_host.cpp) checks, on the CPU, that every element is covered exactly once
// and that the finalise order sums every partial exactly once. The partition depends only on
// the tensor shape, never on the grid size or the GPU: reductions are bitwise reproducible.
#pragma once

#include <cstdint>

#include "kernel_math.h"  // OMPQ_HD

namespace ompq {
namespace plan {

constexpr int kBlock = 256;          // threads per block of the row kernels
constexpr int kWarp = 32;
constexpr int64_t kSeg = 1024;       // elements per warp item (long rows)
constexpr int64_t kLongMin = 256;    // rows of at least this many elements use warp items
constexpr int64_t kIters = 32;       // iterations per tile (short rows)

// Host: a grid of `want` blocks clamped to [1, cap]. Every kernel grid-strides over its work
// and no partition depends on the grid size, so the cap changes no result.
inline int capped_blocks(int64_t want, int64_t cap) {
  return static_cast<int>(want < 1 ? 1 : (want > cap ? cap : want));
}

// x viewed as [outer, C, inner]; a "row" is the `inner` contiguous elements of one (o, c).
//
// Long rows (inner >= kLongMin): work items are (row, segment of <= kSeg elements); one warp
// processes one item (lanes stride through it, coalesced), so the channel is constant per item.
// Partial sums: one slot per item, slot = (o * C + c) * segs + seg (segs = segments per row).
//
// Short rows: a tile is (channel group g, outer tile ot). A group is kc = floor(kBlock / inner)
// consecutive channels (W = kc * inner contiguous columns of an outer row); when one group holds
// all C channels, a tile iteration covers rpi consecutive outer rows at once. Thread t owns one
// column (hence one channel) and walks kIters iterations down the outer rows: consecutive threads
// read consecutive addresses. Partial sums: one slot per (ot, c), slot = ot * C + c (segs = 1).
struct RowPlan {
  int64_t outer = 0, channels = 1, inner = 1, numel = 0;
  bool long_rows = false;
  int64_t segs = 1, items = 0;  // segments per row (1 for short rows), warp items (long rows)
  int64_t kc = 1, width = 1, rpi = 1, rows_per_tile = 1, groups = 0, otiles = 0, tiles = 0;
  int64_t U = 0;  // partial slots: U * C * segs
};

OMPQ_HD RowPlan make_row_plan(int64_t outer, int64_t channels, int64_t inner) {
  RowPlan p;
  p.outer = outer;
  p.channels = channels;
  p.inner = inner;
  p.numel = outer * channels * inner;
  if (p.numel == 0) return p;
  p.long_rows = inner >= kLongMin;
  if (p.long_rows) {
    p.segs = (inner + kSeg - 1) / kSeg;
    p.items = outer * channels * p.segs;
    p.U = outer;
  } else {
    p.kc = kBlock / inner;
    if (p.kc > channels) p.kc = channels;
    p.width = p.kc * inner;
    p.rpi = p.kc == channels ? kBlock / (channels * inner) : 1;
    p.rows_per_tile = p.rpi * kIters;
    p.groups = (channels + p.kc - 1) / p.kc;
    p.otiles = (outer + p.rows_per_tile - 1) / p.rows_per_tile;
    p.tiles = p.groups * p.otiles;
    p.U = p.otiles;
  }
  return p;
}

OMPQ_HD int64_t partial_slots(const RowPlan& p) { return p.U * p.channels * p.segs; }

// Long rows: item -> channel c and element range [begin, end).
OMPQ_HD void long_item(const RowPlan& p, int64_t item, int64_t* c, int64_t* begin,
                       int64_t* end) {
  const int64_t row = p.segs == 1 ? item : item / p.segs;
  const int64_t seg = item - row * p.segs;
  *c = p.channels == 1 ? 0 : row % p.channels;
  *begin = row * p.inner + seg * kSeg;
  const int64_t e = *begin + kSeg;
  const int64_t row_end = (row + 1) * p.inner;
  *end = e < row_end ? e : row_end;
}

// Long-row segment [b, e) cut for packs of N elements (N a power of two): scalar head [b, hb),
// whole packs [hb, ve) whose first element is aligned ((i + shift) % N == 0, shift >= 0: see
// rows::pack_shift) and scalar tail [ve, e); head and tail hold fewer than N elements each.
OMPQ_HD void pack_split(int64_t b, int64_t e, int64_t shift, int64_t N, int64_t* hb,
                        int64_t* ve) {
  int64_t h = b + ((N - ((b + shift) & (N - 1))) & (N - 1));  // first aligned element
  if (h > e) h = e;
  *hb = h;
  *ve = h + ((e - h) & ~(N - 1));
}

// Short rows: thread t of tile -> the tile's channel group and outer tile (set for every t),
// then its first element, its channel, its first outer row and the flat-index step per
// iteration. Returns false when the thread has no column in this tile (base, c, o0 and step
// are then unset; group and otile are still valid).
struct ShortThread {
  int64_t group, otile;  // the tile's channel group and outer tile
  int64_t base, c, o0, step;
};

OMPQ_HD bool short_thread(const RowPlan& p, int64_t tile, int t, ShortThread* st) {
  st->group = tile % p.groups;
  st->otile = tile / p.groups;
  if (t >= p.rpi * p.width) return false;
  const int64_t col = t % p.width;
  const int64_t phase = t / p.width;
  const int64_t local = col / p.inner;  // channel index inside the group
  st->c = st->group * p.kc + local;
  if (st->c >= p.channels) return false;
  st->o0 = st->otile * p.rows_per_tile + phase;
  const int64_t row_len = p.channels * p.inner;
  st->base = st->o0 * row_len + st->group * p.width + col;
  st->step = p.rpi * row_len;
  return true;
}

// Iterations of a short-row thread: min(kIters, outer rows left in its column / rpi, rounded up);
// 0 when its first row is past the end. Element it of the walk is st.base + it * st.step.
OMPQ_HD int64_t short_iters(const RowPlan& p, const ShortThread& st) {
  const int64_t rem = p.outer - st.o0;
  if (rem <= 0) return 0;
  const int64_t n = p.rpi == 1 ? rem : (rem + p.rpi - 1) / p.rpi;
  return n < kIters ? n : kIters;
}

// Slot of the partial sum of (outer unit u, channel c, segment seg).
OMPQ_HD int64_t slot_of(const RowPlan& p, int64_t u, int64_t c, int64_t seg) {
  return (u * p.channels + c) * p.segs + seg;
}

// ---- LSQ finalise ----------------------------------------------------------------------------
// Channel c's partials, in finalise order m = 0 .. M-1, live at
//   slot = c * cstride + (m / S) * ustride + m % S.
// One block of kFinThreads threads sums a range [m0, m1) of one channel: thread t adds
// m = m0 + t, m0 + t + kFinThreads, ... in order (the slot is stepped incrementally: two integer
// divisions per thread, none per partial), then a fixed shared-memory tree (fin_tree) combines
// the kFinThreads sums. When M > kFinChunk the finalise has two levels: block (c, k) sums chunk
// k = [k * kFinChunk, min(M, (k + 1) * kFinChunk)) into level2[c * chunks + k]; then one block
// per channel sums its `chunks` level-2 partials the same way. Every choice depends only on the
// tensor shape (never on the grid size): the result is bitwise reproducible.
constexpr int kFinThreads = 256;
constexpr int64_t kFinChunk = 2048;

struct FinMap {
  int64_t M = 0, S = 1, cstride = 0, ustride = 0;
};
// The row kernels' partials: slot_of(p, u, c, seg) with m = u * segs + seg.
OMPQ_HD FinMap row_fin_map(const RowPlan& p) {
  FinMap f;
  f.M = p.U * p.segs;
  f.S = p.segs;
  f.cstride = p.segs;
  f.ustride = p.channels * p.segs;
  return f;
}
// Level-2 partials of a two-level finalise: channel-major, `chunks` per channel.
OMPQ_HD FinMap chunk_fin_map(int64_t chunks) {
  FinMap f;
  f.M = chunks;
  f.S = 1;
  f.cstride = chunks;
  f.ustride = 1;
  return f;
}
// Level-1 chunks per channel (1: a single level whose one chunk is the whole range).
OMPQ_HD int64_t fin_chunks(int64_t M) {
  return M > kFinChunk ? (M + kFinChunk - 1) / kFinChunk : 1;
}
// Doubles of scratch the LSQ backward needs: part_s, part_z (partial_slots each), then, for a
// two-level finalise, level2_s, level2_z (channels * chunks each).
OMPQ_HD int64_t lsq_scratch_doubles(const RowPlan& p) {
  const int64_t chunks = fin_chunks(row_fin_map(p).M);
  return 2 * partial_slots(p) + (chunks > 1 ? 2 * p.channels * chunks : 0);
}

// Closed form of partial m of channel c (the cursor below steps through the same slots).
OMPQ_HD int64_t fin_slot(const FinMap& f, int64_t c, int64_t m) {
  const int64_t u = m / f.S;
  return c * f.cstride + u * f.ustride + (m - u * f.S);
}
// Channels with at most kWarp partials are finalised by one warp each (lane l adds partial l,
// then a fixed shuffle tree), not by a block of kFinThreads threads.
OMPQ_HD bool fin_by_warp(int64_t M) { return M <= kWarp; }

struct FinCursor {
  int64_t m, end, seg, slot;  // current m (< end while valid), m % S, its slot
  int64_t dseg, dslot, wrap;  // per-step increments
};
// Thread t's walk through [m0, m1) of channel c.
OMPQ_HD FinCursor fin_cursor(const FinMap& f, int64_t c, int64_t m0, int64_t m1, int t) {
  FinCursor k;
  k.m = m0 + t;
  k.end = m1;
  const int64_t u = k.m / f.S;
  k.seg = k.m - u * f.S;
  k.slot = c * f.cstride + u * f.ustride + k.seg;
  const int64_t du = kFinThreads / f.S;
  k.dseg = kFinThreads - du * f.S;
  k.dslot = du * f.ustride + k.dseg;
  k.wrap = f.ustride - f.S;
  return k;
}
OMPQ_HD void fin_next(const FinMap& f, FinCursor* k) {
  k->m += kFinThreads;
  k->seg += k->dseg;
  k->slot += k->dslot;
  if (k->seg >= f.S) {
    k->seg -= f.S;
    k->slot += k->wrap;
  }
}
// Range of block b of a finalise level with `chunks` chunks per channel over M partials.
OMPQ_HD void fin_block(int64_t b, int64_t chunks, int64_t M, int64_t* c, int64_t* m0,
                       int64_t* m1) {
  *c = b / chunks;
  const int64_t k = b - *c * chunks;
  const int64_t len = chunks == 1 ? M : kFinChunk;
  *m0 = k * len;
  *m1 = *m0 + len < M ? *m0 + len : M;
}
// The fixed tree over kFinThreads values (the kernel runs the same steps with __syncthreads
// between them): sh[t] += sh[t + off] for off = kFinThreads / 2, ..., 1; the sum ends in sh[0].
template <typename F>
OMPQ_HD void fin_tree_steps(F&& step) {
  for (int off = kFinThreads / 2; off > 0; off /= 2) step(off);
}

// ---- centered_gram -------------------------------------------------------------------------
constexpr int kGTile = 64;     // output tile (kGTile x kGTile)
constexpr int kGK = 32;        // columns per shared-memory stage
constexpr int kGFlush = 256;   // columns accumulated in fp32 before a flush into fp64
constexpr int64_t kGTargetBlocks = 256;

// Upper-triangle tile pairs (bi <= bj), row-major; D cut into `slices` slices of `slice`
// columns (a multiple of kGFlush). Block (pair, slice) writes its kGTile x kGTile fp64 partial
// Gram to partial[(pair * slices + slice) * kGTile * kGTile]; the finalise sums the slices of an
// entry in slice order.
struct GramPlan {
  int64_t n = 0, d = 0, tiles = 0, pairs = 0, slice = 0, slices = 0;
};

OMPQ_HD GramPlan make_gram_plan(int64_t n, int64_t d) {
  GramPlan g;
  g.n = n;
  g.d = d;
  if (n <= 0 || d <= 0) return g;
  g.tiles = (n + kGTile - 1) / kGTile;
  g.pairs = g.tiles * (g.tiles + 1) / 2;
  const int64_t want = (kGTargetBlocks + g.pairs - 1) / g.pairs;  // slices wanted
  int64_t s = (d + want - 1) / want;
  s = ((s + kGFlush - 1) / kGFlush) * kGFlush;
  g.slice = s;
  g.slices = (d + s - 1) / s;
  return g;
}

// Pair p -> (bi, bj), bi <= bj.
OMPQ_HD void gram_pair(const GramPlan& g, int64_t p, int64_t* bi, int64_t* bj) {
  int64_t i = 0, row_len = g.tiles;
  while (p >= row_len) {
    p -= row_len;
    ++i;
    --row_len;
  }
  *bi = i;
  *bj = i + p;
}
// (bi, bj), bi <= bj -> pair index (inverse of gram_pair).
OMPQ_HD int64_t gram_pair_index(const GramPlan& g, int64_t bi, int64_t bj) {
  return bi * g.tiles - bi * (bi - 1) / 2 + (bj - bi);
}
// Partial of output entry (i, j) (any order) from slice s.
OMPQ_HD int64_t gram_partial_index(const GramPlan& g, int64_t i, int64_t j, int64_t s) {
  const int64_t a = i < j ? i : j, b = i < j ? j : i;
  const int64_t bi = a / kGTile, bj = b / kGTile;
  const int64_t p = gram_pair_index(g, bi, bj);
  return ((p * g.slices + s) * kGTile + (a - bi * kGTile)) * kGTile + (b - bj * kGTile);
}
// Step between the partials of one entry in consecutive slices (from the formula above):
// gram_partial_index(g, i, j, s) == gram_partial_index(g, i, j, 0) + s * kGSliceStride.
constexpr int64_t kGSliceStride = int64_t(kGTile) * kGTile;

}  // namespace plan
}  // namespace ompq
