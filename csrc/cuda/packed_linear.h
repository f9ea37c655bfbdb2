// Raw CUDA launchers for the packed-weight ops (pack_rows, unpack_rows, packed_linear). Plain C++
// interface: device pointers, sizes and a stream; no torch types, so packed_linear.cu needs only
// the CUDA runtime headers. The torch glue (checks, allocation) is packed_linear_glue.cpp.
//
// Layout (docs/DESIGN.md, "Packed runtime layout"): row r of `packed` holds `k` codes
// u in [0, 2^bits - 1] zero-padded to a multiple of 8; every 8 codes form one group of `bits`
// bytes, code j at bits [j·bits, (j+1)·bits) of the little-endian group; rows are row_bytes =
// ceil(k/8)·bits bytes, back to back. Weight: w[r, k] = scale[r] · (u[r, k] - offset[r]).
// `packed` must be 8-byte aligned (the glue copies a misaligned tensor): the kernels read the
// groups of 2, 4 and 8 bytes with one aligned load.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ompq {
namespace cuda {

struct PackedDims {
  int64_t rows;       // output rows (C_out)
  int64_t k;          // codes per row (in_features)
  int64_t row_bytes;  // ceil(k / 8) * bits
  int bits;           // 2..8
};

// Batch rows up to which packed_linear runs the GEMV kernel (one warp per output row); larger
// batches run the tiled kernel (64 × 64 output tiles, weights unpacked into shared memory).
constexpr int64_t kPackedGemvMaxBatch = 4;

// out [rows, row_bytes] from int32 codes [rows, k] (the glue has checked 0 <= code < 2^bits).
cudaError_t pack_rows(const int32_t* codes, PackedDims d, uint8_t* out, cudaStream_t stream);

// out [rows, k] (contiguous) = (float(u) - offset[r]) * scale[r], rounded like the CPU.
cudaError_t unpack_rows(const uint8_t* packed, PackedDims d, const float* scale,
                        const float* offset, float* out, cudaStream_t stream);

// y [n, rows] = x [n, k] @ w.T + bias (bias may be null), fp32 accumulation of
// Σ_k x·(u - offset), then y = scale · Σ + bias. x and y contiguous.
cudaError_t packed_linear(const float* x, int64_t n, const uint8_t* packed, PackedDims d,
                          const float* scale, const float* offset, const float* bias, float* y,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace ompq
