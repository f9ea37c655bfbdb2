// Torch glue for the CUDA packed-weight kernels (built only with a CUDA torch).
//
// Argument checks are the CPU's own (csrc/cpu/packed_checks.h): same rules, same messages.
// pack_rows checks the code range with one device-to-host sync (at::aminmax; packing is a
// one-time step when a layer is built) and, on failure, raises the CPU kernel's message (which
// names the first bad code and its position). unpack_rows and packed_linear never sync.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "../cpu/packed_checks.h"
#include "packed_linear.h"

namespace ompq {
namespace {

using at::Tensor;

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_launch(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "ompq.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(e));
}

void check_cuda(const char* op, const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "ompq.", op, ": ", name, " is on ", t.device(),
                    " but the CUDA kernel was called; put all tensors on one CUDA device");
}

// The kernels read 2-, 4- and 8-byte groups with aligned loads: a tensor whose data does not
// start on an 8-byte boundary (a view into a byte buffer) is copied once.
Tensor aligned(const Tensor& packed) {
  return reinterpret_cast<uintptr_t>(packed.const_data_ptr()) % 8 == 0 ? packed
                                                                       : packed.clone();
}

cuda::PackedDims dims_of(const packed::Geometry& g) {
  return cuda::PackedDims{g.rows, g.k, g.row_bytes, g.bits};
}

Tensor flat_f32(const Tensor& t) { return t.reshape({-1}).contiguous(); }

Tensor pack_rows_cuda(const Tensor& codes_in, int64_t bits) {
  packed::check_codes("pack_rows", codes_in, bits);
  check_cuda("pack_rows", codes_in, "codes");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  const int64_t rows = codes_in.size(0), k = codes_in.size(1);
  const int64_t maxv = (int64_t(1) << bits) - 1;
  if (codes_in.numel() > 0) {
    const auto mm = at::aminmax(codes_in);
    const int64_t lo = std::get<0>(mm).item<int64_t>();
    const int64_t hi = std::get<1>(mm).item<int64_t>();
    if (lo < 0 || hi > maxv) {
      // The CPU kernel raises the message naming the first bad code and its position.
      static auto cpu_op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("ompq::pack_rows", "")
                               .typed<Tensor(const Tensor&, int64_t)>();
      cpu_op.call(codes_in.cpu(), bits);
      TORCH_CHECK_VALUE(false, "ompq.pack_rows: codes must lie in [0, ", maxv, "] for ", bits,
                        " bits (u = q - qmin), got values in [", lo, ", ", hi, "]");
    }
  }
  const Tensor codes = codes_in.to(at::kInt).contiguous();
  const packed::Geometry g{rows, k, packed::row_bytes_for(k, bits), static_cast<int>(bits)};
  Tensor out = at::empty({rows, g.row_bytes}, codes_in.options().dtype(at::kByte));
  check_launch(cuda::pack_rows(codes.const_data_ptr<int32_t>(), dims_of(g),
                               out.mutable_data_ptr<uint8_t>(), stream()),
               "pack_rows");
  return out;
}

void unpack_rows_cuda(const Tensor& packed_in, int64_t bits, int64_t in_features,
                      const Tensor& scale_in, const Tensor& offset_in, const Tensor& out) {
  const char* op = "unpack_rows";
  const packed::Geometry g =
      packed::check_packed(op, packed_in, bits, in_features, scale_in, offset_in);
  packed::check_out(op, out, g, packed_in);
  check_cuda(op, packed_in, "packed");
  const c10::cuda::CUDAGuard guard(packed_in.device());
  if (g.rows == 0 || g.k == 0) return;
  const Tensor packed = aligned(packed_in);
  const Tensor scale = flat_f32(scale_in), offset = flat_f32(offset_in);
  check_launch(cuda::unpack_rows(packed.const_data_ptr<uint8_t>(), dims_of(g),
                                 scale.const_data_ptr<float>(), offset.const_data_ptr<float>(),
                                 out.mutable_data_ptr<float>(), stream()),
               op);
}

Tensor packed_linear_cuda(const Tensor& x_in, const Tensor& packed_in, int64_t bits,
                          int64_t in_features, const Tensor& scale_in, const Tensor& offset_in,
                          const c10::optional<Tensor>& bias_in) {
  const char* op = "packed_linear";
  const packed::Geometry g = packed::check_linear(op, x_in, packed_in, bits, in_features,
                                                   scale_in, offset_in, bias_in);
  check_cuda(op, packed_in, "packed");
  const c10::cuda::CUDAGuard guard(packed_in.device());
  int64_t batch = 1;
  const std::vector<int64_t> out_shape = packed::linear_out_shape(x_in, g, batch);
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  const Tensor bias = has_bias ? flat_f32(*bias_in) : Tensor();
  if (batch == 0 || g.rows == 0) return at::empty(out_shape, x_in.options());
  if (g.k == 0) {
    Tensor y = at::zeros({batch, g.rows}, x_in.options());
    if (has_bias) y.add_(bias);
    return y.reshape(out_shape);
  }
  const Tensor x2d = x_in.reshape({batch, g.k}).contiguous();
  const Tensor packed = aligned(packed_in);
  const Tensor scale = flat_f32(scale_in), offset = flat_f32(offset_in);
  Tensor y = at::empty({batch, g.rows}, x_in.options());
  check_launch(cuda::packed_linear(x2d.const_data_ptr<float>(), batch,
                                   packed.const_data_ptr<uint8_t>(), dims_of(g),
                                   scale.const_data_ptr<float>(), offset.const_data_ptr<float>(),
                                   has_bias ? bias.const_data_ptr<float>() : nullptr,
                                   y.mutable_data_ptr<float>(), stream()),
               op);
  return y.reshape(out_shape);
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_IMPL(ompq, CUDA, m) {
  m.impl("pack_rows", &ompq::pack_rows_cuda);
  m.impl("unpack_rows", &ompq::unpack_rows_cuda);
  m.impl("packed_linear", &ompq::packed_linear_cuda);
}
