"""Distortion tables (ompq.distortion) and the objectives built on them (ompq.objectives)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ompq
from ompq.allocate import allocate
from ompq.distortion import DistortionTable, DistortionTableError
from ompq.objectives import orm_importance
from ompq.profile import Profile
from ompq.quantizers import WeightQuantizer

GOLDEN = Path(__file__).parent / "data" / "orm_linear_golden.json"


def _net(kind: str, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv":
        net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                            nn.Conv2d(width, width, 3, groups=width, padding=1, bias=False),
                            nn.ReLU(), nn.Flatten(), nn.Linear(width * 36, 5))
        bn = net[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3.0)
        bn.weight.data.uniform_(0.5, 2.0)
        return net.eval()
    return nn.Sequential(nn.Linear(12, width), nn.GELU(), nn.Linear(width, 4)).eval()


def _input(kind: str, n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 6, 6, generator=g) if kind == "conv" else torch.randn(n, 12, generator=g)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["conv", "linear"]), width=st.integers(2, 9),
       seed=st.integers(0, 10 ** 6))
def test_tables_are_finite_and_non_increasing_in_bits(kind, width, seed):
    prof = ompq.profile(_net(kind, width, seed), _input(kind), num_samples=16, progress=False)
    table = prof.distortion
    assert table.bits == (2, 3, 4, 5, 6, 7, 8) and table.samples == 16
    for row in list(table.output.values()) + list(table.weight.values()):
        assert all(np.isfinite(row)) and min(row) >= 0
        assert all(a >= b for a, b in zip(row, row[1:]))
        assert row[0] > row[-1]  # 2 bits is visibly worse than 8


def test_output_nsr_matches_a_direct_computation_with_bn_folded():
    net = _net("conv", 4, 3)
    x = _input("conv")
    prof = ompq.profile(net, x, num_samples=16, progress=False, distortion_bits=(3, 5),
                        distortion_samples=8)
    conv, bn = net[0], net[1]
    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    wf = conv.weight.detach() * factor.reshape(-1, 1, 1, 1)
    xs = x[:8]  # all 16 samples are drawn, in order; the table uses the first 8
    for k, b in enumerate((3, 5)):
        wq = WeightQuantizer(b, 4)
        wq.init_scale(wf, "mse")
        d = wq(wf) - wf
        y = torch.nn.functional.conv2d(xs, wf, padding=1).double()
        yc = y - y.mean(dim=(0, 2, 3), keepdim=True)
        noise = torch.nn.functional.conv2d(xs, d, padding=1).double().square().sum()
        assert prof.distortion.output["0"][k] == pytest.approx(float(noise / yc.square().sum()),
                                                               rel=1e-5)
        assert prof.distortion.weight["0"][k] == pytest.approx(float(d.double().square().sum()),
                                                               rel=1e-6)


def _zoo_profile(name="resnet20"):
    train = ompq.data.fashion_mnist("train")
    return ompq.profile(ompq.zoo.load(name), train, num_samples=32, seed=0, progress=False)


@pytest.fixture(scope="module")
def r20():
    return _zoo_profile()


@pytest.mark.parametrize("proxy", ["error", "orm", "random", "orm-linear", "uniform"])
def test_every_objective_stays_within_budget(r20, proxy):
    total = sum(layer.params for layer in r20.layers)
    sizes = [ab * total / 8 / 2 ** 20 for ab in (2.0, 2.5, 3.0, 4.0, 5.5)]
    for distortion in ("output", "weight"):
        cfgs = allocate(r20, size_mb=sizes, proxy=proxy, distortion=distortion)
        for cfg, s in zip(cfgs, sizes):
            assert cfg.size_mb <= s and cfg.proxy == proxy
    macs = sum(layer.macs for layer in r20.layers)
    cfg = allocate(r20, bops_g=3.5 * 8 * macs / 1e9, proxy=proxy)
    assert cfg.bops_g <= 3.5 * 8 * macs / 1e9


def test_default_objective_has_diminishing_returns(r20):
    """Unlike the bang-bang paper objective, the default keeps most layers off the extremes."""
    total = sum(layer.params for layer in r20.layers)
    size = 3 * total / 8 / 2 ** 20
    default = allocate(r20, size_mb=size)
    paper = allocate(r20, size_mb=size, proxy="orm-linear", bits=(2, 3, 4, 5, 6, 8))
    assert default.proxy == "error"

    def share_at_extremes(cfg):
        return sum(layer.params for layer in r20.layers
                   if cfg.weight_bits[layer.name] in (2, 8)) / total
    assert share_at_extremes(paper) > 0.9 and share_at_extremes(default) < 0.5


def test_random_is_a_seeded_permutation_of_the_orm_importance(r20):
    total = sum(layer.params for layer in r20.layers)
    size = 3 * total / 8 / 2 ** 20
    a = allocate(r20, size_mb=size, proxy="random", seed=3)
    b = allocate(r20, size_mb=size, proxy="random", seed=3)
    c = allocate(r20, size_mb=size, proxy="random", seed=4)
    assert a.importance == b.importance and a.weight_bits == b.weight_bits
    assert a.importance != c.importance
    assert sorted(a.importance.values()) == pytest.approx(sorted(orm_importance(r20.orm)))


@pytest.mark.parametrize("model", ["resnet20", "mobilenetv2"])
def test_orm_linear_reproduces_the_previous_default_bit_for_bit(model):
    """tests/data/orm_linear_golden.json: allocations of the former default objective
    (maximise Σ b_i·w_i, ORM importance, β = 3) from the code before this objective moved."""
    train = ompq.data.fashion_mnist("train")
    prof = ompq.profile(ompq.zoo.load(model), train, num_samples=64, seed=0, progress=False,
                        distortion_bits=None)
    for row in json.loads(GOLDEN.read_text())[model]:
        cfg = allocate(prof, size_mb=row["size_mb"], bits=tuple(row["bits"]), proxy="orm-linear")
        assert cfg.weight_bits == row["weight_bits"]
        assert cfg.objective == pytest.approx(row["objective"], rel=1e-12)


def test_profile_json_round_trips_with_its_table(r20, tmp_path):
    path = tmp_path / "p.json"
    r20.to_json(path)
    back = Profile.from_json(path)
    assert back.distortion == r20.distortion
    total = sum(layer.params for layer in r20.layers)
    size = 3 * total / 8 / 2 ** 20
    assert allocate(back, size_mb=size).weight_bits == allocate(r20, size_mb=size).weight_bits


def test_version_1_profile_loads_and_the_default_asks_to_reprofile(r20):
    old = json.loads(r20.to_json())
    old["version"] = 1
    del old["distortion"]
    prof = Profile.from_json(old)
    assert prof.distortion is None
    total = sum(layer.params for layer in r20.layers)
    size = 3 * total / 8 / 2 ** 20
    with pytest.raises(ValueError, match="lacks.*re-profile") as err:
        allocate(prof, size_mb=size)
    assert "\n" not in str(err.value)
    assert allocate(prof, size_mb=size, proxy="orm-linear").status == "OPTIMAL"


def test_bad_tables_name_the_layer(r20):
    total = sum(layer.params for layer in r20.layers)
    size = 3 * total / 8 / 2 ** 20
    d = json.loads(r20.to_json())
    d["distortion"]["output"]["layer2.1.conv1"][1] = float("nan")
    with pytest.raises(DistortionTableError, match="'layer2.1.conv1'.*3 bits is nan"):
        allocate(Profile.from_json(d), size_mb=size)
    d = json.loads(r20.to_json())
    del d["distortion"]["output"]["fc"]
    with pytest.raises(DistortionTableError, match="no row for layer 'fc'"):
        allocate(Profile.from_json(d), size_mb=size)
    with pytest.raises(DistortionTableError, match="layer 'conv1': 10 bits is not in the "
                                                   "profile's distortion table"):
        allocate(r20, size_mb=size, bits=(2, 4, 10))
    with pytest.raises(ValueError, match="distortion must be one of"):
        allocate(r20, size_mb=size, distortion="kl")
    with pytest.raises(ValueError, match="distortion_bits: bit-width 1 is not an integer"):
        ompq.profile(_net("linear", 3, 0), _input("linear"), num_samples=8, progress=False,
                     distortion_bits=(1, 4))


def test_table_dict_round_trip():
    t = DistortionTable(bits=(2, 4), samples=3, weight={"a": [2.0, 1.0]}, output={"a": [0.5, 0.1]})
    assert DistortionTable.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(ValueError, match="lacks the field 'output'"):
        DistortionTable.from_dict({"bits": [2], "samples": 1, "weight": {}})


def test_paper_settings_are_the_reference_defaults(r20):
    from ompq.objectives import paper_settings

    total = sum(layer.params for layer in r20.layers)
    ptq_cfg = allocate(r20, size_mb=3 * total / 8 / 2 ** 20, proxy="orm-linear")
    assert set(ptq_cfg.weight_bits.values()) <= {2, 3, 4}
    qat = paper_settings(r20, "qat")
    cfg = allocate(r20, size_mb=5 * total / 8 / 2 ** 20, **qat)
    assert cfg.weight_bits["conv1"] == cfg.weight_bits["fc"] == 8
    assert set(cfg.weight_bits.values()) <= {4, 5, 6, 7, 8} and cfg.proxy == "orm-linear"
    with pytest.raises(ValueError, match="mode must be one of"):
        paper_settings(r20, "fp8")


def test_default_objective_with_pins_ties_and_bops(r20):
    total = sum(layer.params for layer in r20.layers)
    macs = sum(layer.macs for layer in r20.layers)
    tie = [["layer1.*"]]
    cfg = allocate(r20, size_mb=3 * total / 8 / 2 ** 20, bops_g=4 * 8 * macs / 1e9,
                   pin={"conv1": 8, "fc": 4}, tie=tie)
    assert cfg.weight_bits["conv1"] == 8 and cfg.weight_bits["fc"] == 4
    assert len({b for n, b in cfg.weight_bits.items() if n.startswith("layer1.")}) == 1
    assert cfg.size_mb <= 3 * total / 8 / 2 ** 20 and cfg.bops_g <= 4 * 8 * macs / 1e9


@pytest.mark.slow  # PTQ and evaluation at every budget: ~20 s
def test_frontier_records(r20):
    from ompq.frontier import frontier

    train, test = ompq.data.fashion_mnist("train"), ompq.data.fashion_mnist("test")
    model = ompq.zoo.load("resnet20")
    recs = frontier(model, r20, train, test, avg_bits=(2.0, 3.0), methods=("error", "uniform"),
                    calib_samples=64, eval_limit=200)
    assert [(r["method"], r["avg_bits"]) for r in recs] == [
        ("error", 2.0), ("error", 3.0), ("uniform", 2.0), ("uniform", 3.0)]
    total = sum(layer.params for layer in r20.layers)
    for r in recs:
        assert r["size_mb"] <= r["avg_bits"] * total / 8 / 2 ** 20 * (1 + 1e-9)
        assert r["n"] == 200 and 0 <= r["top1"] <= 100 and r["stage"] == "rtn"
    assert set(recs[3]["w_bits"].values()) == {3}
    assert recs[0]["top1"] == recs[2]["top1"]  # both all-2-bit: the same quantized model
