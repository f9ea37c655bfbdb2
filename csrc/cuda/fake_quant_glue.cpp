// Torch glue for the CUDA fake-quant kernels (built only with a CUDA torch).
//
// Argument checks are the CPU's own (csrc/cpu/fake_quant_checks.h): same rules, same messages.
// Host-side checks (shapes, dtypes, devices, qmin < qmax, grad_factor) run on every call.
// The value checks of scale / zero_point (positive, finite, invertible in float32, zero point in
// range) run in the forward ops only (fake_quant, lsq_fake_quant), on the device, as one fused
// boolean reduction read back with a single sync; on failure scale and zero_point are copied to
// the CPU and the CPU's read_params raises the identical message. While the current stream is
// being captured into a CUDA graph the forward skips that value check (a sync is not allowed
// during capture); validate the parameters with an eager call first. A (scale, zero point)
// pair that passed is remembered per thread (weak references, version counters and data
// pointers, so a freed, modified in place or re-pointed tensor is checked again): a quantizer
// whose parameters did not change since its last call costs no sync.
// The backward ops (fake_quant_backward, lsq_fake_quant_backward) never sync: they are called by
// the autograd formulas with the scale / zero point that the forward validated. Calling them
// directly with invalid values (non-positive, non-finite or non-invertible scale, out-of-range
// zero point) is undefined: the results are meaningless, but nothing is read out of bounds.
// x, grad and the outputs keep their dtype (no conversion kernels): the kernels load
// float32/float64/float16/bfloat16 natively.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <tuple>
#include <unordered_map>

#include "../cpu/fake_quant_checks.h"
#include "fake_quant.h"

namespace ompq {
namespace {

using at::Tensor;
using fq_checks::Layout;

cuda::FqDType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kDouble:
      return cuda::FqDType::kFloat64;
    case at::kHalf:
      return cuda::FqDType::kFloat16;
    case at::kBFloat16:
      return cuda::FqDType::kBFloat16;
    default:
      return cuda::FqDType::kFloat32;  // check_and_layout admits only these four
  }
}

cuda::FqShape shape_of(const Layout& l) { return cuda::FqShape{l.outer, l.channels, l.inner}; }

void check(cudaError_t e, const char* op) {
  TORCH_CHECK(e == cudaSuccess, "ompq.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(e));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// scale / zero point as contiguous float32 (no kernel when they already are).
Tensor as_f32(const Tensor& t) { return t.detach().reshape({-1}).to(at::kFloat).contiguous(); }

struct DevParams {
  Tensor scale, zp;  // float32, raw (the kernels invert the scale and round the LSQ zero point)
};

// The x of a CUDA entry point must be a CUDA tensor (the device guard is built from it). The
// shared checks already put scale / zero point / grad on x's device; this catches the rest
// (e.g. every tensor on the CPU but a CUDA grad) with a readable message.
void check_cuda_x(const char* op, const Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "ompq.", op, ": x is on ", x.device(),
              " but the other tensors are on a CUDA device; put all of them on one device");
}

// scale / zero point as float32 on x's device, without any value check (backward ops).
DevParams raw_params(const Tensor& scale, const Tensor& zero_point) {
  return DevParams{as_f32(scale), as_f32(zero_point)};
}

// Parameters that passed the value check, keyed by the scale's TensorImpl. An entry is valid
// while both tensors are alive (weak references), unmodified (version counters) and still hold
// the same data (data pointers), for the same qmin / qmax / zero-point rounding.
class ValidatedParams {
 public:
  bool contains(const Tensor& scale, const Tensor& zp, int64_t qmin, int64_t qmax,
                bool round_zp) const {
    if (!cacheable(scale, zp)) return false;
    const auto it = entries_.find(scale.unsafeGetTensorImpl());
    return it != entries_.end() && it->second.matches(scale, zp, qmin, qmax, round_zp);
  }
  void insert(const Tensor& scale, const Tensor& zp, int64_t qmin, int64_t qmax, bool round_zp) {
    if (!cacheable(scale, zp)) return;
    if (entries_.size() >= kMaxEntries) entries_.clear();  // bounded; rebuilt on the next calls
    entries_.insert_or_assign(scale.unsafeGetTensorImpl(),
                              Entry{Weak(scale.getIntrusivePtr()), Weak(zp.getIntrusivePtr()),
                                    scale._version(), zp._version(), scale.const_data_ptr(),
                                    zp.const_data_ptr(), qmin, qmax, round_zp});
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  static constexpr size_t kMaxEntries = 4096;
  struct Entry {
    Weak scale, zp;
    int64_t scale_version, zp_version;
    const void* scale_data;
    const void* zp_data;
    int64_t qmin, qmax;
    bool round_zp;
    bool matches(const Tensor& s, const Tensor& z, int64_t lo, int64_t hi, bool rz) const {
      const auto ls = scale.lock();
      const auto lz = zp.lock();
      return ls.get() == s.unsafeGetTensorImpl() && lz.get() == z.unsafeGetTensorImpl() &&
             scale_version == s._version() && zp_version == z._version() &&
             scale_data == s.const_data_ptr() && zp_data == z.const_data_ptr() && qmin == lo &&
             qmax == hi && round_zp == rz;
    }
  };
  // Inference tensors have no version counter: always checked.
  static bool cacheable(const Tensor& s, const Tensor& z) {
    return !s.is_inference() && !z.is_inference();
  }
  std::unordered_map<const c10::TensorImpl*, Entry> entries_;
};

ValidatedParams& validated() {
  static thread_local ValidatedParams cache;
  return cache;
}

// Forward ops: validates scale / zero point on the device with one sync and raises the CPU's
// message on failure. Skipped while the current stream is capturing a CUDA graph, and for
// parameters that passed before and have not changed since.
DevParams device_params(const char* op, const Tensor& scale, const Tensor& zero_point,
                        int64_t qmin, int64_t qmax, bool round_zp, int64_t channels) {
  DevParams p = raw_params(scale, zero_point);
  if (channels == 0) return p;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return p;  // no sync allowed while capturing
  }
  if (validated().contains(scale, zero_point, qmin, qmax, round_zp)) return p;
  Tensor bad = at::empty({1}, p.scale.options().dtype(at::kInt));
  check(cuda::fq_check_params(p.scale.const_data_ptr<float>(), p.zp.const_data_ptr<float>(),
                              channels, static_cast<float>(qmin), static_cast<float>(qmax),
                              round_zp, bad.mutable_data_ptr<int>(), stream()),
        op);
  if (bad.item<int>() != 0) {  // the one device-to-host sync
    fq_checks::read_params(op, scale, zero_point, qmin, qmax, round_zp);  // throws
    TORCH_CHECK(false, "ompq.", op, ": invalid scale or zero_point");
  }
  validated().insert(scale, zero_point, qmin, qmax, round_zp);
  return p;
}

Tensor forward_cuda(const char* op, const Tensor& x_, const Tensor& scale,
                    const Tensor& zero_point, int64_t qmin, int64_t qmax,
                    c10::optional<int64_t> axis, bool round_zp) {
  const Layout l = fq_checks::check_and_layout(op, x_, scale, zero_point, qmin, qmax, axis);
  check_cuda_x(op, x_);
  c10::cuda::CUDAGuard guard(x_.device());
  const DevParams p = device_params(op, scale, zero_point, qmin, qmax, round_zp, l.channels);
  const Tensor x = x_.contiguous();
  Tensor y = at::empty_like(x);
  check(cuda::fake_quant_forward(x.const_data_ptr(), y.mutable_data_ptr(), dtype_of(x),
                                 p.scale.const_data_ptr<float>(), p.zp.const_data_ptr<float>(),
                                 shape_of(l), static_cast<float>(qmin), static_cast<float>(qmax),
                                 round_zp, stream()),
        op);
  return y;
}

Tensor fake_quant_cuda(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                       int64_t qmin, int64_t qmax, c10::optional<int64_t> axis) {
  return forward_cuda("fake_quant", x, scale, zero_point, qmin, qmax, axis, false);
}

Tensor lsq_fake_quant_cuda(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                           int64_t qmin, int64_t qmax, c10::optional<int64_t> axis,
                           double /*grad_factor*/) {
  return forward_cuda("lsq_fake_quant", x, scale, zero_point, qmin, qmax, axis, true);
}

// Argument checks of the backward ops, in order: layout, grad, grad_factor (LSQ only), CUDA x.
Layout backward_checks(const char* op, const Tensor& grad_, const Tensor& x_,
                       const Tensor& scale, const Tensor& zero_point, int64_t qmin, int64_t qmax,
                       c10::optional<int64_t> axis, c10::optional<double> grad_factor) {
  const Layout l = fq_checks::check_and_layout(op, x_, scale, zero_point, qmin, qmax, axis);
  fq_checks::check_grad(op, grad_, x_);
  if (grad_factor.has_value()) fq_checks::check_grad_factor(op, *grad_factor);
  check_cuda_x(op, x_);
  return l;
}

// Shared prologue of the backward ops: the checks above, then, with x's device current for the
// whole op (the guard lives as long as this object), the raw parameters, contiguous x and grad
// and an uninitialised gx like x. Members are initialised in this order.
struct BackwardArgs {
  BackwardArgs(const char* op, const Tensor& grad_, const Tensor& x_, const Tensor& scale,
               const Tensor& zero_point, int64_t qmin, int64_t qmax,
               c10::optional<int64_t> axis, c10::optional<double> grad_factor)
      : l(backward_checks(op, grad_, x_, scale, zero_point, qmin, qmax, axis, grad_factor)),
        guard(x_.device()),
        p(raw_params(scale, zero_point)),  // validated by the forward (see top)
        x(x_.contiguous()),
        g(grad_.contiguous()),
        gx(at::empty_like(x)) {}
  const Layout l;
  const c10::cuda::CUDAGuard guard;
  const DevParams p;
  const Tensor x, g;
  Tensor gx;
};

Tensor fake_quant_backward_cuda(const Tensor& grad_, const Tensor& x_, const Tensor& scale,
                                const Tensor& zero_point, int64_t qmin, int64_t qmax,
                                c10::optional<int64_t> axis) {
  const char* op = "fake_quant_backward";
  BackwardArgs a(op, grad_, x_, scale, zero_point, qmin, qmax, axis, c10::nullopt);
  check(cuda::fake_quant_backward(a.g.const_data_ptr(), a.x.const_data_ptr(),
                                  a.gx.mutable_data_ptr(), dtype_of(a.x),
                                  a.p.scale.const_data_ptr<float>(),
                                  a.p.zp.const_data_ptr<float>(), shape_of(a.l),
                                  static_cast<float>(qmin), static_cast<float>(qmax), stream()),
        op);
  return a.gx;
}

std::tuple<Tensor, Tensor, Tensor> lsq_fake_quant_backward_cuda(
    const Tensor& grad_, const Tensor& x_, const Tensor& scale, const Tensor& zero_point,
    int64_t qmin, int64_t qmax, c10::optional<int64_t> axis, double grad_factor) {
  const char* op = "lsq_fake_quant_backward";
  BackwardArgs a(op, grad_, x_, scale, zero_point, qmin, qmax, axis, grad_factor);
  const Layout& l = a.l;
  const DevParams& p = a.p;
  const Tensor& x = a.x;
  const Tensor& g = a.g;
  Tensor& gx = a.gx;
  const cuda::FqShape shape = shape_of(l);
  const auto dopts = x.options().dtype(at::kDouble);
  Tensor scratch = at::empty({cuda::lsq_scratch_doubles(shape)}, dopts);
  // Outputs written by the finalise kernel directly when float32/float64; other dtypes go through
  // fp64 and a cast. Separate allocations: grad_scale and grad_zero_point never alias.
  const auto sdt = scale.scalar_type();
  const auto zdt = at::isFloatingType(zero_point.scalar_type()) ? zero_point.scalar_type()
                                                                : at::kFloat;
  auto direct = [](at::ScalarType t) { return t == at::kFloat || t == at::kDouble; };
  Tensor gs = at::empty({l.channels}, x.options().dtype(direct(sdt) ? sdt : at::kDouble));
  Tensor gz = at::empty({l.channels}, x.options().dtype(direct(zdt) ? zdt : at::kDouble));
  check(cuda::lsq_backward(g.const_data_ptr(), x.const_data_ptr(), gx.mutable_data_ptr(),
                           dtype_of(x), p.scale.const_data_ptr<float>(),
                           p.zp.const_data_ptr<float>(), shape, static_cast<float>(qmin),
                           static_cast<float>(qmax), static_cast<float>(grad_factor),
                           scratch.mutable_data_ptr<double>(), gs.mutable_data_ptr(),
                           gs.scalar_type() == at::kDouble, gz.mutable_data_ptr(),
                           gz.scalar_type() == at::kDouble, stream()),
        op);
  return std::make_tuple(gx, gs.to(sdt).reshape(scale.sizes()),
                         gz.to(zdt).reshape(zero_point.sizes()));
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_IMPL(ompq, CUDA, m) {
  m.impl("fake_quant", &ompq::fake_quant_cuda);
  m.impl("fake_quant_backward", &ompq::fake_quant_backward_cuda);
  m.impl("lsq_fake_quant", &ompq::lsq_fake_quant_cuda);
  m.impl("lsq_fake_quant_backward", &ompq::lsq_fake_quant_backward_cuda);
}
