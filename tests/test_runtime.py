"""The packed runtime (ompq.runtime): single layers against their fake-quant layers at every
width, subclasses with their own forward, convert / load round trips, both zoo models against
their fake-quant models, error paths, resident memory, and the CLI (`eval --packed`, `bench`)."""
import copy
import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _qmodels import BITS, small_net
from ompq import runtime
from ompq.cli import main
from ompq.packed import save_packed
from ompq.quantize import calibrate_activations, float_weight, quantize_, weight_quantizer

WIDTHS = range(2, 9)
REL_TOL = 1e-5


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − ref| relative to max |ref|."""
    a, ref = a.detach(), ref.detach()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _quantized(layer: nn.Module, bits: int, x: torch.Tensor, *, act: bool = True,
               symmetric: bool = False) -> nn.Module:
    """`layer` quantized in place (8-bit input when `act`), activations calibrated on x."""
    net = nn.Sequential(layer)
    quantize_(net, {"0": bits}, weight_symmetric=symmetric, quantize_input=act)
    calibrate_activations(net, [x])
    return net[0]


# ============================================================================ single layers
LAYERS = {
    "linear": (lambda bias: nn.Linear(19, 12, bias=bias), (6, 19)),          # K % 8 != 0
    "linear-k32": (lambda bias: nn.Linear(32, 7, bias=bias), (3, 5, 32)),    # K % 8 == 0, 3-D x
    "conv": (lambda bias: nn.Conv2d(3, 10, 3, padding=1, bias=bias), (2, 3, 9, 9)),
    "grouped": (lambda bias: nn.Conv2d(8, 12, 3, stride=2, groups=4, bias=bias), (2, 8, 9, 9)),
    "depthwise": (lambda bias: nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=bias), (2, 8, 7, 7)),
}


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("bias", [True, False])
def test_layer_equals_fake_quant(kind, bits, bias, gen):
    make, shape = LAYERS[kind]
    torch.manual_seed(bits)
    x = torch.randn(*shape, generator=gen)
    q = _quantized(make(bias), bits, x)
    packed = runtime.pack_layer(q, kind)
    assert type(packed) is (runtime.PackedLinear if kind.startswith("linear")
                            else runtime.PackedConv2d)
    assert packed.bits == bits and (packed.bias is None) == (not bias)
    with torch.no_grad():
        assert _rel(packed(x), q(x)) <= REL_TOL
    k = math.prod(float_weight(q).shape[1:])
    assert packed.packed.dtype == torch.uint8
    assert tuple(packed.packed.shape) == (float_weight(q).shape[0], -(-k // 8) * bits)


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_symmetric_grid_and_from_float(bits, gen):
    x = torch.randn(4, 19, generator=gen)
    lin = nn.Linear(19, 12)
    q = _quantized(lin, bits, x, symmetric=True)
    with torch.no_grad():
        assert _rel(runtime.PackedLinear.from_quantized(q)(x), q(x)) <= REL_TOL
    # from_float quantizes as PTQ does (MSE scale), the input stays in floating point
    fresh = nn.Linear(19, 12)
    ref = _quantized(copy.deepcopy(fresh), bits, x, act=False)
    pl = runtime.PackedLinear.from_float(fresh, bits)
    assert pl.act_quantizer is None
    with torch.no_grad():
        assert _rel(pl(x), ref(x)) <= REL_TOL
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        w = runtime.PackedConv2d.from_float(conv, bits).packed_weight().dequantize()
        assert w.shape == conv.weight.shape
        assert float((w - conv.weight).abs().max()) < float(conv.weight.abs().max())


@pytest.mark.parametrize("make,shape,cls", [
    (lambda: nn.Conv1d(4, 6, 3, padding=2, padding_mode="reflect"), (2, 4, 11),
     runtime.PackedConv1d),
    (lambda: nn.Conv3d(2, 4, 3, padding=1, groups=2), (1, 2, 5, 5, 5), runtime.PackedConv3d),
    (lambda: nn.Conv2d(3, 5, 3, padding="same", dilation=2, padding_mode="circular"),
     (2, 3, 8, 8), runtime.PackedConv2d),
    (lambda: nn.Conv2d(3, 5, (3, 4), padding="same", padding_mode="replicate"), (2, 3, 8, 8),
     runtime.PackedConv2d),
])
def test_conv_dims_and_padding_modes(make, shape, cls, gen):
    x = torch.randn(*shape, generator=gen)
    q = _quantized(make(), 4, x)
    packed = runtime.pack_layer(q)
    assert type(packed) is cls
    with torch.no_grad():
        assert _rel(packed(x), q(x)) <= REL_TOL


# ============================================================================ subclasses
class Conv2dSame(nn.Conv2d):
    """TF-style "same" padding computed in the forward (as timm's Conv2dSame)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for i in (1, 0):
            size, k, s, d = x.shape[2 + i], self.weight.shape[2 + i], self.stride[i], \
                self.dilation[i]
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation,
                        self.groups)


class GainLinear(nn.Linear):
    """A Linear subclass with its own forward and an extra buffer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("gain", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * F.linear(x, self.weight, self.bias)


class PlainSubclass(nn.Conv2d):
    """A subclass that keeps nn.Conv2d's forward."""


def custom_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(Conv2dSame(1, 6, 3, stride=2), nn.ReLU(), PlainSubclass(6, 6, 3),
                         nn.Flatten(), GainLinear(6 * 3 * 3, 5)).eval()


def test_subclasses_keep_their_forward(tmp_path, gen):
    x = torch.randn(8, 1, 9, 9, generator=gen)
    q = custom_net()
    q[4].gain.fill_(0.25)
    quantize_(q, {"0": 3, "2": 4, "4": 6})
    calibrate_activations(q, [x])
    r = runtime.convert(q)
    assert [type(r[i]) for i in (0, 2, 4)] == [runtime.PackedCustomLayer, runtime.PackedConv2d,
                                                runtime.PackedCustomLayer]
    assert type(r[0].layer) is Conv2dSame and r[0].layer.weight is None
    with torch.no_grad():
        ref = q(x)
        assert _rel(r(x), ref) <= REL_TOL
        save_packed(q, tmp_path / "c.ompq")
        loaded = runtime.load(tmp_path / "c.ompq", custom_net())
        assert float(loaded[4].layer.gain) == 0.25  # the subclass's own buffer, loaded
        assert torch.equal(loaded(x), r(x))
    with pytest.raises(TypeError, match="use PackedCustomLayer"):
        runtime.PackedConv2d.from_quantized(q[0])  # would drop Conv2dSame's forward
    with pytest.raises(TypeError, match="PackedLinear cannot run a Conv2d"):
        runtime.PackedLinear.from_float(nn.Conv2d(1, 2, 3), 4)
    assert runtime.packed_class(nn.Linear(2, 2)) is runtime.PackedLinear
    with pytest.raises(TypeError, match="BatchNorm2d"):
        runtime.packed_class(nn.BatchNorm2d(3))


# ============================================================================ round trips
def _compare(a: nn.Module, b: nn.Module, x: torch.Tensor, batch: int = 500) -> dict:
    """Top-1 agreement (fraction) and mean |a − b| / mean |a| over x."""
    with torch.no_grad():
        ya = torch.cat([a(x[i:i + batch]) for i in range(0, len(x), batch)])
        yb = torch.cat([b(x[i:i + batch]) for i in range(0, len(x), batch)])
    return {"agree": float((ya.argmax(1) == yb.argmax(1)).float().mean()),
            "rel_mean_diff": float((ya - yb).abs().mean() / ya.abs().mean()), "n": len(x),
            "equal": torch.equal(ya, yb)}


def test_ptq_save_load_equals_convert_equals_fake_quant(tmp_path):
    from ompq.ptq import ptq

    x = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    q = ptq(small_net(), BITS, x, num_samples=64, iters=0, act_iters=0, progress=False).model
    save_packed(q, tmp_path / "m.ompq")
    loaded = runtime.load(tmp_path / "m.ompq", small_net)
    converted = runtime.convert(q)
    assert isinstance(loaded[1], nn.Identity) and isinstance(loaded[8], runtime.PackedLinear)
    for i in ("0", "3", "8"):  # K = 9 and 36 (repacked per row) and 16 (stream taken as is)
        a, b = loaded.get_submodule(i), converted.get_submodule(i)
        for key in ("packed", "scale", "offset", "bias"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (i, key)
    r = _compare(q, converted, x)
    assert r["agree"] == 1.0 and r["rel_mean_diff"] <= 1e-5, r
    assert _compare(converted, loaded, x)["equal"]
    assert isinstance(q[0].parametrizations.weight.original, nn.Parameter)  # q untouched


# ============================================================================ zoo models
@functools.lru_cache(maxsize=None)
def _zoo_models(name: str, path: str) -> tuple:
    """(fake-quant, converted, loaded) of zoo model `name` at a mixed 2..8-bit config."""
    import ompq
    from ompq.layers import find_layers

    model = ompq.zoo.load(name)
    bits = {n: (2, 3, 4, 5, 6, 7, 8)[i % 7] for i, (n, _) in enumerate(find_layers(model))}
    q = ompq.ptq(model, bits, ompq.data.fashion_mnist("train"), num_samples=256, iters=0,
                 act_iters=0, progress=False).model
    save_packed(q, path, bits)
    return q, runtime.convert(q), runtime.load(path, name)


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
@pytest.mark.parametrize("n", [2000, pytest.param(10000, id="full", marks=pytest.mark.slow)])
def test_zoo_runtime_matches_fake_quant(name, n, tmp_path_factory):
    from ompq.data import fashion_mnist

    path = str(tmp_path_factory.getbasetemp() / f"{name}.ompq")
    q, converted, loaded = _zoo_models(name, path)
    x = fashion_mnist("test").tensors[0][:n]
    r = _compare(q, loaded, x)
    print(f"{name}: {r}")
    assert r["agree"] >= 0.999 and r["rel_mean_diff"] <= 1e-4, r
    assert _compare(converted, loaded, x[:500])["equal"]


# ============================================================================ errors
def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_unsupported_width_is_refused(tmp_path, gen):
    x = torch.randn(4, 1, 28, 28, generator=gen)
    with pytest.raises(ValueError) as err:
        runtime.PackedLinear.from_float(nn.Linear(4, 4), 9, name="fc")
    _one_line(err, "'fc'", "9-bit")
    m = small_net()
    quantize_(m, {"0": 12, "3": 4, "8": 4})
    calibrate_activations(m, [x])
    with pytest.raises(ValueError) as err:
        runtime.convert(m)
    _one_line(err, "'0'", "12-bit", "2..8")
    save_packed(m, tmp_path / "w12.ompq")
    with pytest.raises(ValueError) as err:
        runtime.load(tmp_path / "w12.ompq", small_net)
    _one_line(err, "'0'", "12-bit")


def _other_net(change: str) -> nn.Module:
    m = small_net()
    if change == "shape":
        m[8] = nn.Linear(16, 12)
    elif change == "class":
        m[8] = nn.Sequential()
    elif change == "missing":
        m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False))
    elif change == "extra":
        m.add_module("9", nn.Linear(10, 2))
    return m


@pytest.mark.parametrize("change,needles", [
    ("shape", ("'8'", "shape")), ("class", ("'8'", "Sequential", "Linear")),
    ("missing", ("'3'", "lacks")), ("extra", ("lacks", "9.weight"))])
def test_mismatched_model_is_refused(tmp_path, gen, change, needles):
    x = torch.randn(4, 1, 28, 28, generator=gen)
    m = small_net()
    quantize_(m, BITS)
    calibrate_activations(m, [x])
    save_packed(m, tmp_path / "m.ompq")
    with pytest.raises(ValueError) as err:
        runtime.load(tmp_path / "m.ompq", _other_net(change))
    _one_line(err, *needles)
    with pytest.raises(ValueError, match="already quantized"):
        runtime.load(tmp_path / "m.ompq", m)


@pytest.mark.parametrize("where", ["header", "last data byte"])
def test_flipped_byte_does_not_load(tmp_path, gen, where):
    x = torch.randn(4, 1, 28, 28, generator=gen)
    m = small_net()
    quantize_(m, BITS)
    calibrate_activations(m, [x])
    path = tmp_path / "m.ompq"
    save_packed(m, path)
    raw = bytearray(path.read_bytes())
    raw[60 if where == "header" else -1] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError) as err:
        runtime.load(path, small_net)
    _one_line(err, repr(str(path)), "checksum")


def test_soft_adaround_is_refused(gen):
    x = torch.randn(4, 1, 28, 28, generator=gen)
    m = small_net()
    quantize_(m, BITS)
    calibrate_activations(m, [x])
    weight_quantizer(m[3]).init_adaround(float_weight(m[3]))
    with pytest.raises(ValueError) as err:
        runtime.convert(m)
    _one_line(err, "'3'", "soft AdaRound")
    with pytest.raises(ValueError, match="no quantized layers"):
        runtime.convert(small_net())


# ============================================================================ memory
def _float_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every floating tensor `module` and its submodules hold: parameters, buffers, plain
    tensor attributes and scratch buffers."""
    out = []
    for m in module.modules():
        out += [t for t in m.parameters(recurse=False)] + list(m.buffers(recurse=False))
        out += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        scratch = getattr(m, "scratch", None)
        if isinstance(scratch, runtime.Scratch):
            out += scratch.tensors()
    return [t for t in out if t.is_floating_point()]


def test_packed_linear_keeps_no_float_weight(gen):
    x = torch.randn(8, 1000, generator=gen)
    q = _quantized(nn.Linear(1000, 300), 3, x)
    pl = runtime.pack_layer(q)
    runtime.SCRATCH.clear()  # convolutions of earlier tests in this thread filled it
    with torch.no_grad():
        pl(x)
    assert max(t.numel() for t in _float_tensors(pl)) < 300 * 1000 // 100
    mem = runtime.memory_bytes(pl)
    assert mem["packed_weights"] == 300 * 125 * 3 and mem["scratch"] == 0
    assert mem["parameters"] + mem["buffers"] - mem["packed_weights"] <= 3 * 300 * 4 + 64


def test_model_memory_is_packed_bytes(gen):
    """Quantized layers hold their packed bytes plus O(C_out) fp32 vectors; after a forward
    the convolutions share one scratch buffer per thread, sized to the largest conv weight."""
    x = torch.randn(4, 1, 28, 28, generator=gen)
    m = small_net()
    quantize_(m, BITS)
    calibrate_activations(m, [x])
    r = runtime.convert(m)
    layers = [r[i] for i in (0, 3, 8)]
    ks = {"0": 9, "3": 36, "8": 16}
    rows = {"0": 8, "3": 16, "8": 10}
    assert runtime.memory_bytes(r)["packed_weights"] == sum(
        rows[n] * -(-ks[n] // 8) * b for n, b in BITS.items())
    for layer in layers:
        vectors = sum(t.numel() * 4 for t in _float_tensors(layer))
        assert vectors <= 3 * layer.weight_shape[0] * 4 + 64  # scale, offset, bias, act range
    runtime.SCRATCH.clear()  # other tests of this thread may have grown it
    with torch.no_grad():
        y = r(x)
    assert runtime.memory_bytes(r)["scratch"] == 4 * 16 * 36  # the largest conv weight
    assert all(layer.scratch is runtime.SCRATCH for layer in layers)
    assert copy.deepcopy(r)[0].scratch is runtime.SCRATCH
    assert _rel(y, m(x)) <= REL_TOL


# ============================================================================ CLI
@pytest.fixture
def packed_file(tmp_path, gen):
    x = torch.randn(64, 1, 12, 12, generator=gen)
    m = small_net()
    quantize_(m, BITS)
    calibrate_activations(m, [x])
    save_packed(m, tmp_path / "m.ompq", BITS)
    return str(tmp_path / "m.ompq")


SMALL = ["--model", "_qmodels:small_net", "--data", "random:1,12,12", "--no-progress"]


def test_cli_eval_runtime_and_fake_quant(packed_file, tmp_path, capsys):
    recs = {}
    for engine, extra in (("runtime", []), ("fake-quant", ["--fake-quant"])):
        out = tmp_path / f"{engine}.json"
        assert main(["eval", *SMALL, "--packed", packed_file, "--limit", "64", *extra,
                     "--json", str(out)]) == 0
        recs[engine] = json.loads(out.read_text())
    assert recs["runtime"]["engine"] == "runtime" and recs["runtime"]["method"] == "packed"
    assert recs["runtime"]["top1"] == recs["fake-quant"]["top1"]
    assert abs(recs["runtime"]["loss"] - recs["fake-quant"]["loss"]) < 1e-5
    assert "packed (runtime)" in capsys.readouterr().out
    assert main(["eval", *SMALL, "--fake-quant"]) == 2
    assert "--fake-quant needs --packed" in capsys.readouterr().err


def test_cli_bench(packed_file, capsys):
    assert main(["bench", *SMALL, "--packed", packed_file, "--batch", "1,4", "--iters", "3",
                 "--warmup", "1", "--json", "-"]) == 0
    cap = capsys.readouterr()
    rec = json.loads(cap.out)
    assert [r["model"] for r in rec["results"]] == ["fp32", "fake-quant", "runtime"]
    for r in rec["results"]:
        assert set(r["latency_ms"]) == {"1", "4"} and all(v > 0 for v in r["latency_ms"].values())
        assert r["param_buffer_bytes"] > 0 and isinstance(r["rss_delta_bytes"], int)
    runtime_rec = rec["results"][2]
    assert runtime_rec["packed_weight_bytes"] == sum(
        n * -(-k // 8) * b for n, k, b in ((8, 9, 3), (16, 36, 2), (10, 16, 5)))
    assert rec["max_abs_diff"] <= 1e-5 and "ms/batch @4" in cap.err
    assert runtime_rec["scratch_bytes"] <= 4 * 16 * 36  # one buffer: the largest conv weight
    assert main(["bench", *SMALL, "--packed", packed_file, "--batch", "0"]) == 2
