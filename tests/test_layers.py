"""Layer discovery and measurement (ompq.layers)."""
import pytest
import torch
from torch import nn

from ompq.layers import QUANTIZABLE_TYPES, LayerInfo, find_layers, measure_layers


class Net(nn.Module):
    """Two branches so registration order differs from execution order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8 * 4 * 4, 5)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c1 = nn.Conv1d(2, 4, 3)
        self.c3 = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.bn = nn.BatchNorm2d(8)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.dw(self.stem(x))))
        z = self.c1(x.flatten(2)[:, :2, :10])
        w = self.c3(x[:, :1].unsqueeze(1))
        return self.head(y.flatten(1)) + z.sum() + w.sum()


def test_find_layers_types_and_patterns():
    net = Net()
    names = [n for n, _ in find_layers(net)]
    assert names == ["head", "stem", "dw", "c1", "c3", "unused"]
    assert [n for n, _ in find_layers(net, include="c*")] == ["c1", "c3"]
    kept = [n for n, _ in find_layers(net, exclude=["unused", "head"])]
    assert kept == ["stem", "dw", "c1", "c3"]
    assert [n for n, _ in find_layers(net, types=(nn.Linear,))] == ["head", "unused"]
    assert nn.Conv3d in QUANTIZABLE_TYPES


@pytest.mark.parametrize("kwargs, match", [
    ({"include": "nope*"}, "include pattern 'nope\\*' matches no layer"),
    ({"exclude": ["stem", "zzz"]}, "exclude pattern 'zzz' matches no layer"),
    ({"include": "stem", "exclude": "stem"}, "leave no layer"),
    ({"types": (nn.LSTM,)}, "has no layer of the types"),
    ({"include": 3}, "must be a glob"),
])
def test_find_layers_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        find_layers(Net(), **kwargs)


def test_find_layers_needs_module():
    with pytest.raises(TypeError, match="nn.Module"):
        find_layers("resnet")


def test_measure_layers_execution_order_and_counts():
    net = Net().train()
    x = torch.randn(2, 3, 8, 8)
    infos = measure_layers(net, x, names=["head", "stem", "dw", "c1", "c3"])
    assert net.training  # mode restored
    assert [i.name for i in infos] == ["stem", "dw", "c1", "c3", "head"]
    by = {i.name: i for i in infos}
    stem = by["stem"]
    assert stem.params == 8 * 3 * 9 and stem.out_shape == (8, 4, 4) and stem.in_shape == (3, 8, 8)
    assert stem.macs == 8 * 4 * 4 * 3 * 9
    dw = by["dw"]
    assert dw.groups == 8 and dw.macs == 8 * 4 * 4 * 1 * 9 and dw.params == 8 * 9
    assert by["c1"].macs == 4 * 8 * 2 * 3 and by["c1"].kind == "Conv1d"
    assert by["c3"].macs == 2 * 8 * 8 * 1 * 9 and by["c3"].kind == "Conv3d"
    assert by["head"].macs == 5 * 128 and by["head"].params == 5 * 128


def test_measure_layers_counts_every_call_and_any_input_size():
    lin = nn.Linear(4, 6)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)[:, :4]))

    (info,) = measure_layers(Twice(), torch.randn(3, 4))
    assert info.macs == 2 * 24 and info.out_shape == (6,)
    (seq,) = measure_layers(nn.Sequential(nn.Linear(4, 6)), torch.randn(2, 7, 4))
    assert seq.macs == 7 * 6 * 4 and seq.out_shape == (7, 6)


def test_measure_layers_unused_layer_errors():
    with pytest.raises(ValueError, match="'unused'.*did not run"):
        measure_layers(Net(), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="no module named 'ghost'"):
        measure_layers(Net(), torch.randn(1, 3, 8, 8), names=["ghost"])


def test_layerinfo_dict_roundtrip():
    info = LayerInfo("a.b", "Conv2d", 10, 20, (3, 4, 4), (1, 8, 8), groups=1)
    assert LayerInfo.from_dict(info.to_dict()) == info
    with pytest.raises(ValueError, match="lacks the field 'macs'"):
        LayerInfo.from_dict({"name": "x", "kind": "Linear", "params": 1})
