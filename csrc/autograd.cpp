// Autograd of the two hot ops, fake_quant and lsq_fake_quant, in C++.
//
// Every PTQ/QAT step calls these on every weight and activation. Registering their autograd in
// Python (torch.library.register_autograd) costs about 40 us of interpreter time per forward and
// backward, which on a GPU is longer than the kernels themselves for tensors up to ~50 MB. Here
// the forward redispatches below autograd to the CPU/CUDA kernel and the backward calls the
// `*_backward` ops through the dispatcher, so the ops stay traceable: torch.compile and
// torch.library.opcheck see the same ops and the fake kernels registered in ompq/ops.py. The
// less frequent ops (adaround_fake_quant, adaround_reg, centered_gram) keep their autograd in
// ompq/ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace ompq {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using FqSig = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                     std::optional<int64_t>);
using FqBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                             int64_t, std::optional<int64_t>);
using LsqSig = Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                      std::optional<int64_t>, double);
using LsqBackwardSig = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                          const Tensor&, const Tensor&, int64_t,
                                                          int64_t, std::optional<int64_t>, double);

template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

std::optional<int64_t> saved_axis(AutogradContext* ctx) {
  const c10::IValue& a = ctx->saved_data["axis"];
  return a.isNone() ? std::nullopt : std::optional<int64_t>(a.toInt());
}

void save_qargs(AutogradContext* ctx, int64_t qmin, int64_t qmax, std::optional<int64_t> axis) {
  ctx->saved_data["qmin"] = qmin;
  ctx->saved_data["qmax"] = qmax;
  ctx->saved_data["axis"] = axis.has_value() ? c10::IValue(*axis) : c10::IValue();
}

// y = fake_quant(x; scale, zero_point); straight-through gradient for x only.
class FakeQuantFunction : public torch::autograd::Function<FakeQuantFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale,
                        const Tensor& zero_point, int64_t qmin, int64_t qmax,
                        std::optional<int64_t> axis) {
    static const auto op = find_op<FqSig>("ompq::fake_quant");
    Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = op.call(x, scale, zero_point, qmin, qmax, axis);
    }
    ctx->save_for_backward({x, scale, zero_point});
    save_qargs(ctx, qmin, qmax, axis);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<FqBackwardSig>("ompq::fake_quant_backward");
    const auto saved = ctx->get_saved_variables();
    Tensor gx;
    if (ctx->needs_input_grad(0) && grads[0].defined()) {
      gx = op.call(grads[0], saved[0], saved[1], saved[2], ctx->saved_data["qmin"].toInt(),
                   ctx->saved_data["qmax"].toInt(), saved_axis(ctx));
    }
    return {gx, Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// y = lsq_fake_quant(x; scale, zero_point); gradients for x, scale and zero_point.
class LsqFakeQuantFunction : public torch::autograd::Function<LsqFakeQuantFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& scale,
                        const Tensor& zero_point, int64_t qmin, int64_t qmax,
                        std::optional<int64_t> axis, double grad_factor) {
    static const auto op = find_op<LsqSig>("ompq::lsq_fake_quant");
    Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = op.call(x, scale, zero_point, qmin, qmax, axis, grad_factor);
    }
    ctx->save_for_backward({x, scale, zero_point});
    save_qargs(ctx, qmin, qmax, axis);
    ctx->saved_data["grad_factor"] = grad_factor;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = find_op<LsqBackwardSig>("ompq::lsq_fake_quant_backward");
    const auto saved = ctx->get_saved_variables();
    const bool any = ctx->needs_input_grad(0) || ctx->needs_input_grad(1) ||
                     ctx->needs_input_grad(2);
    if (!any || !grads[0].defined()) {
      return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    }
    auto [gx, gs, gz] = op.call(grads[0], saved[0], saved[1], saved[2],
                                ctx->saved_data["qmin"].toInt(), ctx->saved_data["qmax"].toInt(),
                                saved_axis(ctx), ctx->saved_data["grad_factor"].toDouble());
    return {ctx->needs_input_grad(0) ? gx : Tensor(), ctx->needs_input_grad(1) ? gs : Tensor(),
            ctx->needs_input_grad(2) ? gz : Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor fake_quant_autograd(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                           int64_t qmin, int64_t qmax, std::optional<int64_t> axis) {
  return FakeQuantFunction::apply(x, scale, zero_point, qmin, qmax, axis);
}

Tensor lsq_fake_quant_autograd(const Tensor& x, const Tensor& scale, const Tensor& zero_point,
                               int64_t qmin, int64_t qmax, std::optional<int64_t> axis,
                               double grad_factor) {
  return LsqFakeQuantFunction::apply(x, scale, zero_point, qmin, qmax, axis, grad_factor);
}

}  // namespace
}  // namespace ompq

TORCH_LIBRARY_IMPL(ompq, Autograd, m) {
  m.impl("fake_quant", &ompq::fake_quant_autograd);
  m.impl("lsq_fake_quant", &ompq::lsq_fake_quant_autograd);
}
