// C++ unit tests of the ompq ops, called through the dispatcher (as any libtorch user would) and
// checked against plain scalar loops. Returns non-zero when any check fails. Run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <limits>
#include <string>
#include <vector>

#include "expect.h"

namespace {


using at::Tensor;
using Stack = std::vector<c10::IValue>;

bool has_op(const char* name) {
  return c10::Dispatcher::singleton().findSchema({name, ""}).has_value();
}

Stack call(const char* name, Stack args) {
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  op.callBoxed(&args);
  return args;
}

c10::IValue axis_arg(int64_t axis) { return axis < -100 ? c10::IValue() : c10::IValue(axis); }
constexpr int64_t kNone = -1000;

// Scalar reference: y = (clamp(nearbyint(x * inv) + z, qmin, qmax) - z) * s, NaN -> qmin.
float fq_ref(float x, float s, float z, float qmin, float qmax) {
  const float inv = 1.0f / s;
  float q = std::nearbyint(x * inv) + z;
  if (!(q >= qmin)) q = qmin;
  if (q > qmax) q = qmax;
  return (q - z) * s;
}

// Channel of flat index i for x viewed as [outer, C, inner].
int64_t channel(int64_t i, int64_t c, int64_t inner) { return (i / inner) % c; }

Tensor test_input(std::vector<int64_t> shape, float s0, uint64_t seed) {
  at::manual_seed(seed);
  Tensor x = at::randn(shape) * 6.0 * s0;
  float* p = x.data_ptr<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; i += 7) p[i] = (std::round(p[i] / s0) + 0.5f) * s0;  // near-ties
  if (n > 10) {
    p[1] = std::numeric_limits<float>::quiet_NaN();
    p[3] = std::numeric_limits<float>::infinity();
    p[5] = -std::numeric_limits<float>::infinity();
    p[9] = 1e30f;
  }
  return x;
}

void test_fake_quant(std::vector<int64_t> shape, int64_t axis) {
  const int64_t dim = static_cast<int64_t>(shape.size());
  const int64_t ax = axis == kNone ? -1 : (axis < 0 ? axis + dim : axis);
  const int64_t C = ax < 0 ? 1 : shape[ax];
  int64_t inner = 1;
  if (ax >= 0) {
    for (int64_t d = ax + 1; d < dim; ++d) inner *= shape[d];
  } else {
    for (auto v : shape) inner *= v;
  }
  const float qmin = -8, qmax = 7;
  Tensor scale = at::rand({C}) * 0.2 + 0.05;
  Tensor zp = at::randint(-3, 4, {C}).to(at::kFloat);
  Tensor x = test_input(shape, 0.125f, 7 + C);
  Tensor g = at::randn(shape);
  Tensor y = call("ompq::fake_quant", {x, scale, zp, int64_t(-8), int64_t(7), axis_arg(axis)})[0]
                 .toTensor();
  Tensor gx = call("ompq::fake_quant_backward",
                   {g, x, scale, zp, int64_t(-8), int64_t(7), axis_arg(axis)})[0]
                  .toTensor();
  const float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>(), *gp = g.data_ptr<float>(),
              *gxp = gx.data_ptr<float>(), *sp = scale.data_ptr<float>(),
              *zpp = zp.data_ptr<float>();
  int64_t bad = 0, bad_g = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const int64_t c = channel(i, C, inner);
    if (yp[i] != fq_ref(xp[i], sp[c], zpp[c], qmin, qmax)) ++bad;
    const float q = std::nearbyint(xp[i] * (1.0f / sp[c])) + zpp[c];
    const float want = gp[i] * ((q >= qmin && q <= qmax) ? 1.0f : 0.0f);
    if (gxp[i] != want) ++bad_g;
  }
  EXPECT(bad == 0, "fake_quant axis " << axis << ": " << bad << " elements differ");
  EXPECT(bad_g == 0, "fake_quant_backward axis " << axis << ": " << bad_g << " elements differ");

  // LSQ: forward with the rounded zero point; backward gradients summed per channel in double.
  Tensor zf = zp + 0.25;
  auto out = call("ompq::lsq_fake_quant_backward",
                  {g, x, scale, zf, int64_t(-8), int64_t(7), axis_arg(axis), 0.5});
  Tensor lgx = out[0].toTensor(), lgs = out[1].toTensor(), lgz = out[2].toTensor();
  std::vector<double> ws(C, 0.0), wz(C, 0.0);
  bad = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const int64_t c = channel(i, C, inner);
    const float s = sp[c], inv = 1.0f / s, z = std::nearbyint(zpp[c] + 0.25f);
    const float xq = std::nearbyint(z + xp[i] * inv);
    const bool inside = xq >= qmin && xq <= qmax;
    if (lgx.data_ptr<float>()[i] != gp[i] * (inside ? 1.0f : 0.0f)) ++bad;
    if (inside) {
      ws[c] += ((gp[i] * ((xq - z) * s - xp[i])) * inv) * 0.5f;
    } else {
      ws[c] += (gp[i] * ((xq > qmax) ? qmax - z : qmin - z)) * 0.5f;
      wz[c] += ((gp[i] * -1.0f) * s) * 0.5f;
    }
  }
  EXPECT(bad == 0, "lsq grad_x axis " << axis << ": " << bad << " elements differ");
  for (int64_t c = 0; c < C; ++c) {
    const double es = std::abs(lgs.data_ptr<float>()[c] - ws[c]);
    const double ez = std::abs(lgz.data_ptr<float>()[c] - wz[c]);
    EXPECT(es <= 1e-4 * (1.0 + std::abs(ws[c])), "lsq grad_scale[" << c << "] "
                                                  << lgs.data_ptr<float>()[c] << " vs " << ws[c]);
    EXPECT(ez <= 1e-4 * (1.0 + std::abs(wz[c])), "lsq grad_zero_point[" << c << "] "
                                                  << lgz.data_ptr<float>()[c] << " vs " << wz[c]);
  }
  // The forward of LSQ equals fake_quant with the rounded zero point.
  Tensor ly = call("ompq::lsq_fake_quant",
                   {x, scale, zf, int64_t(-8), int64_t(7), axis_arg(axis), 1.0})[0]
                  .toTensor();
  Tensor fy = call("ompq::fake_quant",
                   {x, scale, at::round(zf), int64_t(-8), int64_t(7), axis_arg(axis)})[0]
                  .toTensor();
  EXPECT(at::equal(ly, fy), "lsq forward != fake_quant with rounded zero point, axis " << axis);
}

void expect_error(const char* what, Stack args, const std::string& needle,
                  const char* op = "ompq::fake_quant") {
  try {
    call(op, std::move(args));
    EXPECT(false, what << ": no error raised");
  } catch (const c10::Error& e) {
    const std::string msg = e.what();
    EXPECT(msg.find(needle) != std::string::npos,
           what << ": message lacks '" << needle << "': " << msg.substr(0, 300));
  }
}

void test_errors() {
  Tensor x = at::randn({2, 3});
  Tensor s1 = at::full({1}, 0.1), z1 = at::zeros({1});
  expect_error("int x", {at::ones({3}, at::kInt), s1, z1, int64_t(0), int64_t(15), c10::IValue()},
               "x must be a floating-point tensor");
  expect_error("qmin >= qmax", {x, s1, z1, int64_t(5), int64_t(5), c10::IValue()},
               "qmin (5) must be smaller than qmax (5)");
  expect_error("scale length", {x, at::full({2}, 0.1), at::zeros({2}), int64_t(0), int64_t(15),
                                c10::IValue(int64_t(1))},
               "scale has 2 elements but x.size(1) = 3 channels");
  expect_error("bad axis", {x, s1, z1, int64_t(0), int64_t(15), c10::IValue(int64_t(2))},
               "axis 2 is out of range");
  expect_error("negative scale", {x, -s1, z1, int64_t(0), int64_t(15), c10::IValue()},
               "scale must be positive and finite");
  expect_error("zero point range", {x, s1, at::full({1}, 16.0), int64_t(0), int64_t(15),
                                    c10::IValue()},
               "is outside [qmin, qmax]");
}

// The C++ autograd of fake_quant / lsq_fake_quant (csrc/autograd.cpp): gradients through the
// dispatcher equal the backward ops called directly, and only inputs that need them get one.
void test_autograd() {
  at::manual_seed(5);
  Tensor x0 = at::randn({3, 4, 9}) * 0.8;
  Tensor g = at::randn({3, 4, 9});
  Tensor s0 = at::rand({4}) * 0.1 + 0.05;
  Tensor z0 = at::full({4}, 2.0);
  const c10::IValue axis(int64_t(1));
  {
    Tensor x = x0.clone().requires_grad_();
    Tensor y = call("ompq::fake_quant", {x, s0, z0, int64_t(-8), int64_t(7), axis})[0].toTensor();
    EXPECT(y.requires_grad(), "fake_quant output does not require grad");
    Tensor gx = torch::autograd::grad({y}, {x}, {g})[0];
    Tensor want = call("ompq::fake_quant_backward",
                       {g, x0, s0, z0, int64_t(-8), int64_t(7), axis})[0].toTensor();
    EXPECT(at::equal(gx, want), "fake_quant autograd grad_x differs from fake_quant_backward");
  }
  {
    Tensor x = x0.clone().requires_grad_();
    Tensor s = s0.clone().requires_grad_();
    Tensor z = z0.clone().requires_grad_();
    Tensor y = call("ompq::lsq_fake_quant",
                    {x, s, z, int64_t(-8), int64_t(7), axis, 0.5})[0].toTensor();
    auto grads = torch::autograd::grad({y}, {x, s, z}, {g});
    Stack want = call("ompq::lsq_fake_quant_backward",
                      {g, x0, s0, z0, int64_t(-8), int64_t(7), axis, 0.5});
    for (size_t i = 0; i < 3; ++i) {
      EXPECT(at::equal(grads[i], want[i].toTensor()),
             "lsq_fake_quant autograd gradient " << i << " differs from lsq_fake_quant_backward");
    }
  }
  {
    Tensor s = s0.clone().requires_grad_();  // only the scale is learned
    Tensor y = call("ompq::lsq_fake_quant",
                    {x0, s, z0, int64_t(-8), int64_t(7), axis, 1.0})[0].toTensor();
    y.backward(g);
    EXPECT(s.grad().defined() && s.grad().sizes() == s.sizes(), "scale gradient missing");
    EXPECT(!x0.grad().defined() && !z0.grad().defined(), "gradient for an input without grad");
  }
}

void test_centered_gram() {
  if (!has_op("ompq::centered_gram")) return;
  at::manual_seed(3);
  Tensor x = at::randn({6, 50}) + 3.0;
  Tensor gm = call("ompq::centered_gram", {x})[0].toTensor();
  const int64_t n = 6, d = 50;
  std::vector<double> mean(d, 0.0);
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < d; ++k) mean[k] += xp[i * d + k] / double(n);
  double worst = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (int64_t k = 0; k < d; ++k) acc += (xp[i * d + k] - mean[k]) * (xp[j * d + k] - mean[k]);
      worst = std::max(worst, std::abs(gm.index({i, j}).item<double>() - acc) / (1.0 + std::abs(acc)));
    }
  }
  EXPECT(gm.sizes() == at::IntArrayRef({6, 6}), "centered_gram shape " << gm.sizes());
  EXPECT(worst < 1e-4, "centered_gram relative error " << worst);
}

void test_adaround_reg() {
  if (!has_op("ompq::adaround_reg")) return;
  at::manual_seed(4);
  Tensor v = at::randn({40}) * 3.0;
  const double beta = 2.5;
  const double got = call("ompq::adaround_reg", {v, beta})[0].toTensor().item<double>();
  double want = 0.0;
  for (int64_t i = 0; i < v.numel(); ++i) {
    const double sg = 1.0 / (1.0 + std::exp(-double(v.data_ptr<float>()[i])));
    const double h = std::min(1.0, std::max(0.0, sg * 1.2 - 0.1));
    want += 1.0 - std::pow(std::abs(2.0 * h - 1.0), beta);
  }
  EXPECT(std::abs(got - want) <= 1e-4 * (1.0 + std::abs(want)),
         "adaround_reg " << got << " vs " << want);
}

// pack_rows / unpack_rows / packed_linear against scalar loops: the layout bit by bit, the
// dequantized weight exactly, y within 1e-5 (relative) of an fp64 product, at every width.
void test_packed() {
  if (!has_op("ompq::packed_linear")) return;
  at::manual_seed(5);
  const int64_t rows = 5, k = 37;
  for (int64_t bits = 2; bits <= 8; ++bits) {
    Tensor codes = at::randint(0, int64_t(1) << bits, {rows, k}, at::kLong);
    Tensor packed = call("ompq::pack_rows", {codes, bits})[0].toTensor();
    const int64_t rb = (k + 7) / 8 * bits;
    EXPECT(packed.sizes() == at::IntArrayRef({rows, rb}), "pack_rows shape " << packed.sizes());
    const int64_t* c = codes.data_ptr<int64_t>();
    const uint8_t* p = packed.data_ptr<uint8_t>();
    bool layout_ok = true;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < rb * 8; ++i) {  // stream bit i of the row = bit i % b of code i / b
        const int64_t code = i / bits < k ? c[r * k + i / bits] : 0;
        layout_ok &= ((p[r * rb + i / 8] >> (i % 8)) & 1) == ((code >> (i % bits)) & 1);
      }
    EXPECT(layout_ok, "pack_rows layout at " << bits << " bits");
    Tensor scale = at::rand({rows}) + 0.1, offset = at::full({rows}, float(1 << (bits - 1)));
    Tensor w = at::empty({rows, k});
    call("ompq::unpack_rows", {packed, bits, k, scale, offset, w});
    bool exact = true;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < k; ++j) {
        const float want = (static_cast<float>(c[r * k + j]) - offset.data_ptr<float>()[r]) *
                           scale.data_ptr<float>()[r];
        exact &= w.data_ptr<float>()[r * k + j] == want;
      }
    EXPECT(exact, "unpack_rows at " << bits << " bits");
    for (int64_t n : {1, 3, 9}) {
      Tensor x = at::randn({n, k}), bias = at::randn({rows});
      Tensor y = call("ompq::packed_linear", {x, packed, bits, k, scale, offset, bias})[0]
                     .toTensor();
      double worst = 0.0;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t r = 0; r < rows; ++r) {
          double want = bias.data_ptr<float>()[r], mag = std::abs(want);
          for (int64_t j = 0; j < k; ++j) {
            const double t =
                double(x.data_ptr<float>()[i * k + j]) * w.data_ptr<float>()[r * k + j];
            want += t;
            mag += std::abs(t);
          }
          worst = std::max(worst, std::abs(y.data_ptr<float>()[i * rows + r] - want) / mag);
        }
      EXPECT(worst < 1e-5, "packed_linear at " << bits << " bits, batch " << n << ": " << worst);
    }
  }
}

}  // namespace

int main() {
  try {
    test_fake_quant({4, 5, 37}, kNone);
    test_fake_quant({4, 5, 37}, 0);
    test_fake_quant({4, 5, 37}, 1);
    test_fake_quant({4, 5, 37}, -1);
    test_fake_quant({3, 2000}, 0);  // long rows: vector path across chunks
    test_fake_quant({70000}, kNone);  // several parallel chunks, per-tensor
    test_errors();
    test_autograd();
    test_centered_gram();
    test_adaround_reg();
    test_packed();
  } catch (const std::exception& e) {
    std::cerr << "FAIL: unexpected exception: " << e.what() << std::endl;
    return 2;
  }
  return ompq_test::finish();
}
