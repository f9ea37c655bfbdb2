"""QAT: an interrupted and resumed run ends with exactly the weights of an uninterrupted one;
torchrun with 2 CPU processes (gloo)."""
import os
import textwrap

import pytest
import torch
from torch import nn

from ompq.qat import CHECKPOINT_NAME, qat
from ompq.quantize import is_quantized, weight_quantizer

from _helpers import torchrun


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                         nn.ReLU(), nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * 8 * 8, 3)).eval()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return x, y


CFG = {"0": 4, "5": 3}


def _run(tmp, **kw):
    res = qat(_model(), CFG, _data(), epochs=3, lr=0.05, batch_size=32, checkpoint_dir=tmp,
              progress=False, **kw)
    return res.model, res.stats()


def test_resume_after_interruption_is_exact(tmp_path):
    full, s_full = _run(tmp_path / "a")
    assert s_full["steps"] == 9 and (tmp_path / "a" / CHECKPOINT_NAME).exists()
    assert is_quantized(full[0]) and is_quantized(full[5])
    assert type(full[0]).__mro__[1] is nn.Conv2d and type(full[5]).__mro__[1] is nn.Linear
    assert isinstance(full[1], nn.Identity)  # BN folded
    part, s_part = _run(tmp_path / "b", max_steps=5)  # killed in the middle of epoch 2
    assert s_part["interrupted"] and s_part["steps"] == 5
    ckpt = torch.load(tmp_path / "b" / CHECKPOINT_NAME, weights_only=False)
    assert ckpt["epoch"] == 0
    resumed, s_res = _run(tmp_path / "b")
    assert s_res["start_epoch"] == 1 and s_res["steps"] == 9
    fs, rs = full.state_dict(), resumed.state_dict()
    assert fs.keys() == rs.keys()
    for k in fs:
        assert torch.equal(fs[k], rs[k]), k
    # the 4 steps after the interruption moved both the weights and the learned (LSQ) step sizes
    ps = part.state_dict()
    for k in ("0.parametrizations.weight.original", "0.parametrizations.weight.0.scale",
              "5.parametrizations.weight.original", "5.parametrizations.weight.0.scale"):
        assert not torch.equal(fs[k], ps[k]), k


def test_qat_keeps_the_callers_rng(tmp_path):
    import random

    import numpy as np
    model, data = _model(), _data()
    torch.manual_seed(123)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    qat(model, CFG, data, epochs=1, batch_size=32, checkpoint_dir=tmp_path, progress=False)
    after = (torch.get_rng_state(), np.random.get_state()[1], random.getstate())
    assert torch.equal(before[0], after[0]) and (before[1] == after[1]).all()
    assert before[2] == after[2]


def test_ste_method_and_bits_mismatch(tmp_path):
    m, _ = _run(tmp_path, method="ste")
    assert weight_quantizer(m[0]).symmetric and weight_quantizer(m[0]).dynamic
    with pytest.raises(ValueError, match="differ from the bit_config"):  # resuming, other bits
        qat(_model(), {"0": 8, "5": 3}, _data(), epochs=3, batch_size=32, checkpoint_dir=tmp_path,
            progress=False)


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_qat import _model, _data, CFG
    from ompq.qat import qat
    import torch.distributed as dist
    res = qat(_model(), CFG, _data(), epochs=2, lr=0.05, batch_size=32, progress=False,
              checkpoint_dir={ckpt!r})
    torch.save(res.model.state_dict(), {out!r} + str(res.rank) + ".pt")
    assert res.world_size == 2
""")


@pytest.mark.slow  # two torchrun processes
def test_torchrun_two_cpu_processes(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__), ckpt=str(tmp_path / "ck"),
                                    out=str(tmp_path / "rank")))
    torchrun(str(script))
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k  # DDP kept the replicas identical
    assert (tmp_path / "ck" / CHECKPOINT_NAME).exists()
