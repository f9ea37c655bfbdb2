// Argument checks of the packed-weight ops (pack_rows, unpack_rows, packed_linear), shared by the
// CPU kernels (csrc/cpu/packed_linear.cpp) and the CUDA glue (csrc/cuda/packed_linear_glue.cpp),
// so both devices accept the same arguments and raise the same messages. ompq/reference.py
// raises the same messages too (ValueError for TORCH_CHECK_VALUE, TypeError for
// TORCH_CHECK_TYPE).
//
// Packed layout (docs/DESIGN.md, "Packed runtime layout"): a layer of `rows` output rows with
// K = in_features codes per row, width b in 2..8. Each row is zero-padded to K8 = ceil(K/8)·8
// codes; every 8 consecutive codes form one group of b bytes, code j of the group at bits
// [j·b, (j+1)·b) of the little-endian b-byte integer. The tensor is uint8 [rows, K8·b/8].
#pragma once

#include <vector>

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cstdint>

namespace ompq {
namespace packed {

using at::Tensor;

constexpr int64_t kMinBits = 2;
constexpr int64_t kMaxBits = 8;

// Bytes of one packed row of `k` codes at `bits` bits: ceil(k / 8) groups of `bits` bytes.
inline int64_t row_bytes_for(int64_t k, int64_t bits) { return (k + 7) / 8 * bits; }

struct Geometry {
  int64_t rows = 0;       // output rows (C_out)
  int64_t k = 0;          // codes per row (in_features)
  int64_t row_bytes = 0;  // bytes per packed row
  int bits = 0;
};

inline void check_bits(const char* op, int64_t bits) {
  TORCH_CHECK_VALUE(bits >= kMinBits && bits <= kMaxBits, "ompq.", op,
                    ": bits must be an integer in 2..8, got ", bits);
}

// packed: uint8 [rows, ceil(in_features/8)·bits], contiguous; scale / offset: float32 with one
// value per row, on packed's device.
inline Geometry check_packed(const char* op, const Tensor& packed, int64_t bits,
                             int64_t in_features, const Tensor& scale, const Tensor& offset) {
  check_bits(op, bits);
  TORCH_CHECK_VALUE(in_features >= 0, "ompq.", op, ": in_features must be >= 0, got ",
                    in_features);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "ompq.", op,
                   ": packed must be a uint8 tensor (the packed codes), got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.dim() == 2, "ompq.", op,
                    ": packed must be 2-D [out_rows, bytes_per_row], got a ", packed.dim(),
                    "-D tensor of shape ", packed.sizes());
  Geometry g;
  g.rows = packed.size(0);
  g.k = in_features;
  g.bits = static_cast<int>(bits);
  g.row_bytes = row_bytes_for(in_features, bits);
  TORCH_CHECK_VALUE(packed.size(1) == g.row_bytes, "ompq.", op, ": packed has ", packed.size(1),
                    " bytes per row, but in_features = ", in_features, " at ", bits,
                    " bits needs ceil(", in_features, " / 8) * ", bits, " = ", g.row_bytes,
                    " bytes per row; pack the weight with pack_rows(codes, ", bits, ")");
  TORCH_CHECK_VALUE(packed.is_contiguous(), "ompq.", op,
                    ": packed must be contiguous (rows of ", g.row_bytes,
                    " bytes back to back); call .contiguous() once when building the layer");
  TORCH_CHECK_TYPE(scale.scalar_type() == at::kFloat, "ompq.", op,
                   ": scale must be float32, got ", scale.scalar_type());
  TORCH_CHECK_TYPE(offset.scalar_type() == at::kFloat, "ompq.", op,
                   ": offset must be float32, got ", offset.scalar_type());
  TORCH_CHECK_VALUE(scale.numel() == g.rows, "ompq.", op, ": scale has ", scale.numel(),
                    " elements but packed has ", g.rows, " rows (one scale per output row)");
  TORCH_CHECK_VALUE(offset.numel() == g.rows, "ompq.", op, ": offset has ", offset.numel(),
                    " elements but packed has ", g.rows,
                    " rows (one offset = zero_point - qmin per output row)");
  TORCH_CHECK_VALUE(scale.device() == packed.device() && offset.device() == packed.device(),
                    "ompq.", op, ": scale (", scale.device(), ") and offset (", offset.device(),
                    ") must be on the device of packed (", packed.device(), ")");
  return g;
}

inline void check_bias(const char* op, const c10::optional<Tensor>& bias, const Geometry& g,
                       const Tensor& packed) {
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK_TYPE(bias->scalar_type() == at::kFloat, "ompq.", op,
                   ": bias must be float32, got ", bias->scalar_type());
  TORCH_CHECK_VALUE(bias->numel() == g.rows, "ompq.", op, ": bias has ", bias->numel(),
                    " elements but packed has ", g.rows, " rows (one bias per output row)");
  TORCH_CHECK_VALUE(bias->device() == packed.device(), "ompq.", op, ": bias is on ",
                    bias->device(), " but packed is on ", packed.device());
}

inline void check_x(const char* op, const Tensor& x, const Geometry& g, const Tensor& packed) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "ompq.", op, ": x must be float32, got ",
                   x.scalar_type(), " (convert with .float())");
  TORCH_CHECK_VALUE(x.dim() >= 1, "ompq.", op, ": x must have at least 1 dimension, got a 0-D "
                    "tensor");
  TORCH_CHECK_VALUE(x.size(-1) == g.k, "ompq.", op, ": x has ", x.size(-1),
                    " features in its last dimension (shape ", x.sizes(),
                    ") but in_features = ", g.k);
  TORCH_CHECK_VALUE(x.device() == packed.device(), "ompq.", op, ": x is on ", x.device(),
                    " but packed is on ", packed.device(), "; put all tensors on one device");
}

// unpack_rows' destination: float32, contiguous, rows × in_features elements with out.size(0)
// = rows (any trailing shape, e.g. a conv weight [C_out, C_in/groups, kh, kw]).
inline void check_out(const char* op, const Tensor& out, const Geometry& g,
                      const Tensor& packed) {
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "ompq.", op, ": out must be float32, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() >= 1 && out.size(0) == g.rows && out.numel() == g.rows * g.k,
                    "ompq.", op, ": out has shape ", out.sizes(), " but the weight is ", g.rows,
                    " x ", g.k, " (out.size(0) must be ", g.rows, " and out.numel() ",
                    g.rows * g.k, ")");
  TORCH_CHECK_VALUE(out.is_contiguous(), "ompq.", op, ": out must be contiguous");
  TORCH_CHECK_VALUE(out.device() == packed.device(), "ompq.", op, ": out is on ", out.device(),
                    " but packed is on ", packed.device());
}

// pack_rows' codes: an integer tensor [rows, K] (values are checked by the kernels).
inline void check_codes(const char* op, const Tensor& codes, int64_t bits) {
  check_bits(op, bits);
  TORCH_CHECK_TYPE(at::isIntegralType(codes.scalar_type(), /*includeBool=*/false), "ompq.", op,
                   ": codes must be an integer tensor (uint8, int32 or int64), got ",
                   codes.scalar_type());
  TORCH_CHECK_VALUE(codes.dim() == 2, "ompq.", op,
                    ": codes must be 2-D [out_rows, in_features], got a ", codes.dim(),
                    "-D tensor of shape ", codes.sizes());
}

/// Every check of a packed_linear entry point, in order; returns the layer's geometry.
inline Geometry check_linear(const char* op, const Tensor& x, const Tensor& packed, int64_t bits,
                             int64_t in_features, const Tensor& scale, const Tensor& offset,
                             const c10::optional<Tensor>& bias) {
  const Geometry g = check_packed(op, packed, bits, in_features, scale, offset);
  check_bias(op, bias, g, packed);
  check_x(op, x, g, packed);
  return g;
}

/// The output shape [..., C_out] of packed_linear on `x`; `batch` gets the rows of x.
inline std::vector<int64_t> linear_out_shape(const Tensor& x, const Geometry& g,
                                             int64_t& batch) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = g.rows;
  batch = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) batch *= x.size(d);
  return shape;
}

}  // namespace packed
}  // namespace ompq
