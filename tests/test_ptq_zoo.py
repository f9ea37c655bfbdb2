"""PTQ on the embedded ResNet-20 (real trained model, Fashion-MNIST): 8-bit stays within 0.5 points
of FP32, and at 4 bits AdaRound reconstruction beats round-to-nearest with the same scales."""
import functools

import pytest

from ompq import zoo
from ompq.data import fashion_mnist
from ompq.evaluate import evaluate
from ompq.ptq import ptq
from ompq.layers import find_layers

pytestmark = pytest.mark.slow  # PTQ of a real model: ~10 s


@functools.lru_cache(maxsize=1)
def _setup():
    model = zoo.load("resnet20")
    train, test = fashion_mnist("train"), fashion_mnist("test")
    sub = (test.tensors[0][:1000], test.tensors[1][:1000])
    names = [n for n, _ in find_layers(model)]
    fp = evaluate(model, sub, progress=False)["top1"]
    return model, train, sub, names, fp


def test_zoo_ptq_8bit_within_half_a_point_of_fp32():
    model, train, sub, names, fp = _setup()
    q = ptq(model, {n: 8 for n in names}, train, num_samples=256, iters=0, act_iters=0,
            progress=False).model
    assert abs(evaluate(q, sub, progress=False)["top1"] - fp) <= 0.5


def test_zoo_ptq_4bit_adaround_beats_round_to_nearest():
    model, train, sub, names, fp = _setup()
    cfg = {n: 4 for n in names}
    rtn = ptq(model, cfg, train, num_samples=256, iters=0, act_iters=0, progress=False).model
    ada = ptq(model, cfg, train, num_samples=256, iters=100, act_iters=0, progress=False).model
    acc_rtn = evaluate(rtn, sub, progress=False)["top1"]
    acc_ada = evaluate(ada, sub, progress=False)["top1"]
    assert acc_ada > acc_rtn, (acc_ada, acc_rtn, fp)
