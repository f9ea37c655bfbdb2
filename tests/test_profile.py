"""Streaming profiler (ompq.profile)."""
import json
import importlib
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ompq.layers import measure_layers
from ompq.orm import orm_matrix
from ompq.profile import Profile, profile

profile_mod = importlib.import_module("ompq.profile")


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class Net(nn.Module):
    """Stem conv-BN-ReLU, a residual block, a conv with a functional ReLU, a GELU MLP head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.block = Block(8)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(48, 16)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(16, 5)
        with torch.no_grad():  # non-trivial BN statistics
            for bn in (self.bn, self.block.bn1, self.block.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.act(self.bn(self.stem(x)))
        x = self.block(x)
        x = F.relu(self.down(x))
        x = self.pool(x).flatten(1)
        return self.fc2(self.gelu(self.fc1(x)))

    def slow_features(self, x):
        """Every layer's feature, kept all at once (post BN/activation modules, as documented)."""
        b = self.block
        f_stem = self.act(self.bn(self.stem(x)))
        f_c1 = b.relu(b.bn1(b.conv1(f_stem))).clone()
        f_c2 = torch.relu(b.bn2(b.conv2(f_c1)) + f_stem)
        f_down = self.down(f_c2)  # F.relu is functional: not followed
        f_fc1 = self.gelu(self.fc1(self.pool(F.relu(f_down)).flatten(1)))
        f_fc2 = self.fc2(f_fc1)
        return ["stem", "block.conv1", "block.conv2", "down", "fc1", "fc2"], \
            [f_stem, f_c1, f_c2, f_down, f_fc1, f_fc2]


def _data(gen, n=40):
    return torch.randn(n, 3, 8, 8, generator=gen)


def _drawn(x, n, seed):
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx.sort().values]


def test_profile_equals_slow_features(gen):
    torch.manual_seed(0)
    net, x = Net(), _data(gen)
    prof = profile(net, x, num_samples=16, seed=3, progress=False)
    with torch.no_grad():
        names, feats = net.eval().slow_features(_drawn(x, 16, 3))
    assert prof.names == names
    assert torch.allclose(prof.orm, orm_matrix(feats), rtol=1e-5, atol=1e-7)
    deb = profile(net, x, num_samples=16, seed=3, debiased=True, progress=False)
    assert torch.allclose(deb.orm, orm_matrix(feats, debiased=True), rtol=1e-5, atol=1e-6)


def test_profile_feature_output_uses_raw_outputs(gen):
    torch.manual_seed(0)
    net, x = Net(), _data(gen)
    prof = profile(net, x, num_samples=12, seed=1, feature="output", progress=False)
    feats = []
    hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o.clone()))
             for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net.eval()(_drawn(x, 12, 1))
    for h in hooks:
        h.remove()
    assert torch.allclose(prof.orm, orm_matrix(feats), rtol=1e-5, atol=1e-7)


def test_profile_layer_stats_match_measure_layers(gen):
    net, x = Net(), _data(gen)
    prof = profile(net, x, num_samples=8, progress=False)
    assert prof.layers == measure_layers(net, x[:3])
    assert set(prof.timings) == {"forward", "gram", "distortion", "orm", "total"}
    parts = sum(prof.timings[k] for k in ("forward", "gram", "distortion", "orm"))
    assert prof.timings["forward"] > 0 and parts <= prof.timings["total"]  # disjoint parts
    assert prof.num_samples == 8 and prof.feature == "auto" and prof.model == "Net"


def test_profile_holds_one_pending_feature_at_most(gen, monkeypatch):
    recorders = []

    class Spy(profile_mod._Recorder):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            recorders.append(self)

    monkeypatch.setattr(profile_mod, "_Recorder", Spy)
    depth = 6
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()]
    net = nn.Sequential(*layers)
    refs = []
    dead_checks = []

    def keep_ref(m, i, o):
        refs.append(weakref.ref(o))

    def check(m, i, o):  # when conv k has run, features of layers < k - 1 must be freed
        dead_checks.append(sum(r() is not None for r in refs[:-1]))

    for m in net:
        if isinstance(m, nn.ReLU):
            m.register_forward_hook(keep_ref)
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(check)
    prof = profile(net, torch.randn(10, 4, 6, 6, generator=gen), num_samples=10, progress=False)
    assert len(prof.layers) == depth
    assert recorders[0].max_pending == 1 and recorders[0].pending is None
    # a 2-sample forward first finds the BN that PTQ folds (distortion table), then the profile
    assert len(dead_checks) == 2 * depth and dead_checks[depth:] == [0] * depth
    assert len(recorders[0].grams) == depth


def test_profile_inputs_dataset_loader_and_seed(gen):
    torch.manual_seed(0)
    net, x = Net(), _data(gen)
    y = torch.zeros(40, dtype=torch.long)
    a = profile(net, x, num_samples=10, seed=5, progress=False)
    b = profile(net, torch.utils.data.TensorDataset(x, y), num_samples=10, seed=5, progress=False)
    assert torch.equal(a.orm, b.orm)
    c = profile(net, x, num_samples=10, seed=6, progress=False)
    assert not torch.equal(a.orm, c.orm)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    d1 = profile(net, loader, num_samples=10, seed=2, progress=False)
    d2 = profile(net, loader, num_samples=10, seed=2, progress=False)
    assert torch.equal(d1.orm, d2.orm)
    e = profile(net, [x[:10]], num_samples=10, progress=False)
    f = profile(net, x[:10], num_samples=10, progress=False)
    assert torch.equal(e.orm, f.orm)


def test_profile_restores_mode_and_leaves_bn_untouched(gen):
    net = Net().train()
    before = net.bn.running_mean.clone()
    profile(net, _data(gen), num_samples=8, progress=False)
    assert net.training and net.block.training
    assert torch.equal(net.bn.running_mean, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_profile_shared_layer_accumulates_gram(gen):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    net, x = Twice(), torch.randn(9, 5, generator=gen)
    prof = profile(net, x, num_samples=9, feature="output", progress=False)
    with torch.no_grad():
        h1 = net.a(x)
        h2 = net.a(h1)
        out = net.b(h2)
    ref = orm_matrix([torch.cat([h1, h2], dim=1), out])
    assert torch.allclose(prof.orm, ref, rtol=1e-5)
    assert prof.layers[0].macs == 2 * 25


def test_profile_constant_layer_warns_with_name(gen):
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    with torch.no_grad():
        net[0].weight.zero_()
    with pytest.warns(RuntimeWarning, match="layer '0' has a constant feature"):
        prof = profile(net, torch.randn(8, 4, generator=gen), num_samples=8, progress=False)
    assert not torch.isnan(prof.orm).any()


def test_profile_non_finite_feature_names_the_layer(gen):
    net = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    with torch.no_grad():
        net[1].bias[0] = float("inf")
    for feature in ("auto", "output"):
        with pytest.raises(ValueError, match="layer '1' has a non-finite feature"):
            profile(net, torch.randn(8, 4, generator=gen), num_samples=8, feature=feature,
                    progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_samples": 3}, "at least 4"),
    ({"num_samples": 41}, "40 samples along dim 0, fewer than num_samples = 41"),
    ({"num_samples": 8.0}, "must be an int"),
    ({"feature": "pre"}, "feature must be one of"),
    ({"memory_format": "nhwc"}, "memory_format must be one of"),
    ({"include": "nothing*"}, "matches no layer"),
])
def test_profile_bad_arguments(gen, kwargs, match):
    args = {"num_samples": 8, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        profile(Net(), _data(gen), progress=False, **args)


def test_profile_bad_inputs(gen):
    with pytest.raises(TypeError, match="inputs must be a tensor"):
        profile(Net(), 42, num_samples=8, progress=False)
    with pytest.raises(ValueError, match="holds 5 samples.*fewer than num_samples = 8"):
        profile(Net(), [torch.randn(5, 3, 8, 8)], num_samples=8, progress=False)

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.idle = nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="'idle'.*did not run"):
        profile(Skip(), torch.randn(8, 3), num_samples=8, progress=False)


def test_profile_json_roundtrip(gen, tmp_path):
    prof = profile(Net(), _data(gen), num_samples=8, progress=False)
    back = Profile.from_json(prof.to_json())
    assert back.layers == prof.layers and torch.equal(back.orm, prof.orm)
    assert back.timings == prof.timings and back.model == prof.model
    path = tmp_path / "p.json"
    prof.to_json(path)
    assert torch.equal(Profile.from_json(path).orm, prof.orm)
    assert torch.equal(Profile.from_json(str(path)).orm, prof.orm)
    data = json.loads(prof.to_json())
    assert back.batch_size == 8 and back.processes == 1
    with pytest.raises(ValueError, match="version 4, newer than this ompq reads"):
        Profile.from_json(json.dumps({**data, "version": 4}))
    with pytest.raises(ValueError, match="expected JSON with format 'ompq.Profile'"):
        Profile.from_json(json.dumps({**data, "format": "ompq.BitConfig"}))
    with pytest.raises(FileNotFoundError, match="no such ompq.Profile JSON file"):
        Profile.from_json(str(tmp_path / "missing.json"))


class _ViewNet(nn.Module):
    """A conv net whose forward `.view`s a spatial activation: fails on channels_last input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.shape[0], -1))


def test_profile_memory_format_does_not_change_the_orm(gen):
    torch.manual_seed(0)
    net, x = Net(), _data(gen)
    fast = profile(net, x, num_samples=16, seed=3, progress=False)  # auto: channels_last input
    plain = profile(net, x, num_samples=16, seed=3, progress=False, memory_format="preserve")
    cl = profile(net, x, num_samples=16, seed=3, progress=False, memory_format="channels_last")
    assert fast.names == plain.names
    torch.testing.assert_close(fast.orm, plain.orm, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast.orm, cl.orm)
    assert all(p.is_contiguous() for p in net.parameters())  # the model is not converted


def test_profile_memory_format_falls_back_when_the_forward_needs_contiguous(gen):
    torch.manual_seed(0)
    net, x = _ViewNet(), _data(gen)
    plain = profile(net, x, num_samples=8, progress=False, memory_format="preserve")
    with pytest.warns(RuntimeWarning, match="failed on a channels_last input"):
        auto = profile(net, x, num_samples=8, progress=False)
    assert torch.equal(auto.orm, plain.orm)
    with pytest.raises(RuntimeError, match="view"):
        profile(net, x, num_samples=8, progress=False, memory_format="channels_last")
    with pytest.raises(ValueError, match="needs a 4-D"):
        profile(nn.Sequential(nn.Linear(4, 4)), torch.randn(8, 4), num_samples=8,
                progress=False, memory_format="channels_last")


class _MoveRecorder(nn.Sequential):
    """Records `.to(device)` calls without moving (the CPU-only CI has no second device)."""

    def __init__(self, *layers):
        super().__init__(*layers)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append(torch.device(args[0]))
        return self


def test_profile_moves_the_model_back_when_the_input_is_rejected():
    net = _MoveRecorder(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="needs a 4-D"):
        profile(net, torch.randn(8, 4), num_samples=8, progress=False, device="meta",
                memory_format="channels_last")
    assert net.moves == [torch.device("meta"), torch.device("cpu")]
