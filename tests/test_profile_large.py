"""Large-model profiling: inputs of any form, token masks, micro-batches, processes, bf16."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ompq
from ompq.profile import micro_batches
from ompq.zoo import transformer as T

from _helpers import torchrun


def _encoder():
    torch.manual_seed(0)
    return T.tiny_encoder().eval()


def _profile(model, data, **kw):
    kw.setdefault("num_samples", 32)
    kw.setdefault("progress", False)
    return ompq.profile(model, data, **kw)


class _DictItems(Dataset):
    """A Dataset whose items are dicts without the batch dim (Hugging Face style)."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def test_dict_inputs_every_form_gives_the_same_profile():
    model, data = _encoder(), T.tokens(48, 16, seed=1)
    ref = _profile(model, data)
    assert len(ref.layers) == 9 and ref.names[0] == "blocks.0.attn.qkv"  # fused qkv found
    positional = ((data["input_ids"], data["attention_mask"]),)  # model(ids, mask)
    assert torch.equal(_profile(model, positional, mask=None).orm,
                       _profile(model, data, mask=None).orm)
    assert torch.equal(_profile(model, _DictItems(data)).orm, ref.orm)
    assert torch.equal(_profile(model, (data, torch.zeros(48))).orm, ref.orm)  # (inputs, labels)
    ds = _DictItems(data)
    stream = DataLoader(ds, batch_size=10)  # dict batches; the first 32 of 40 read, sorted draw
    pooled = {k: v[:40] for k, v in data.items()}
    assert torch.equal(_profile(model, stream).orm, _profile(model, pooled).orm)


def test_samples_are_drawn_consistently_across_dict_entries():
    data = {"a": torch.arange(20).float().unsqueeze(1), "b": torch.arange(20) * 10}
    x = ompq.data.sample_inputs(data, 8, seed=3)
    assert torch.equal(x["a"].squeeze(1).long() * 10, x["b"])
    assert set(x) == {"a", "b"}


def test_padding_does_not_change_the_orm():
    model, data = _encoder(), T.tokens(64, 16, seed=2)
    ref = _profile(model, data, batch_size=8)
    changed = {k: v.clone() for k, v in data.items()}
    pad = changed["attention_mask"] == 0
    assert pad.any()
    changed["input_ids"][pad] = torch.randint(1, 100, (int(pad.sum()),))
    moved = _profile(model, changed, batch_size=8)
    assert torch.equal(moved.orm, ref.orm)
    assert moved.distortion.to_dict() == ref.distortion.to_dict()  # meters see real tokens only
    unmasked = _profile(model, changed, batch_size=8, mask=None)
    assert (unmasked.orm - ref.orm).abs().max() > 1e-3  # without the mask the padding counts
    explicit = _profile(model, data, batch_size=8, mask=data["attention_mask"])
    assert torch.equal(explicit.orm, ref.orm)
    named = _profile(model, data, batch_size=8, mask="attention_mask")
    assert torch.equal(named.orm, ref.orm)


def test_one_micro_batch_is_the_full_batch_debiased_orm():
    model, data = _encoder(), T.tokens(64, 16, seed=4)
    full = _profile(model, data, debiased=True)
    for size in (32, 100):
        mb = _profile(model, data, batch_size=size, debiased=True)
        assert torch.equal(mb.orm, full.orm) and mb.batch_size == 32
    assert full.layers == _profile(model, data, batch_size=8).layers  # MACs per sample, once
    biased = _profile(model, data)
    assert not biased.debiased and _profile(model, data, batch_size=8).debiased


def test_micro_batches_cover_every_sample_with_at_least_four():
    assert micro_batches(18, 8) == [(0, 8), (8, 18)]
    assert micro_batches(20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert micro_batches(8, 32) == [(0, 8)]


def test_micro_batched_distortion_equals_the_full_batch_table():
    model, data = _encoder(), T.tokens(32, 16, seed=5)
    a = _profile(model, data, distortion_samples=12).distortion
    b = _profile(model, data, distortion_samples=12, batch_size=4).distortion
    for name in a.output:
        assert a.output[name] == pytest.approx(b.output[name], rel=1e-9)
        assert a.weight[name] == pytest.approx(b.weight[name], rel=1e-12)


@pytest.mark.slow  # ~15 s: profiles of up to 4 096 samples
def test_minibatch_orm_converges_to_the_full_batch_debiased_orm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1))
    ref = _profile(net, x, num_samples=4096, debiased=True, distortion_bits=None).orm
    errors = []
    for n in (64, 256, 1024):
        err = [float((_profile(net, x, num_samples=n, seed=s, batch_size=16,
                                distortion_bits=None).orm - ref).abs().mean()) for s in range(3)]
        errors.append(sum(err) / len(err))
    # The error falls like 1/√N (×4 samples: ~÷2): allow ÷1.4 per step.
    assert errors[1] < errors[0] / 1.4 and errors[2] < errors[1] / 1.4, errors
    assert errors[2] < 0.02, errors


def test_bf16_model_gram_in_fp32_matches_the_fp32_profile():
    model, data = _encoder(), T.tokens(32, 16, seed=6)
    ref = _profile(model, data, batch_size=8, distortion_bits=None)
    half = _profile(_encoder().to(torch.bfloat16), data, batch_size=8, distortion_bits=None)
    assert half.orm.dtype == torch.float64
    assert (half.orm - ref.orm).abs().max() < 0.05  # bf16 activations, fp32 Grams


@pytest.mark.parametrize("kwargs, error, match", [
    ({"batch_size": 3}, ValueError, "batch_size must be at least 4"),
    ({"batch_size": 8, "debiased": False}, ValueError, "debiased=False with 4 micro-batches"),
    ({"mask": torch.ones(48, 15)}, ValueError, "mask has T = 15 positions, but no layer"),
    ({"mask": torch.ones(40, 16)}, ValueError, r"mask has shape \(40, 16\); it must be \(N, T\) "
     "with the N = 48 rows"),
    ({"mask": torch.ones(48)}, ValueError, r"mask has shape \(48,\)"),
    ({"mask": "pad"}, ValueError, "mask='pad' names no entry of the inputs"),
    ({"mask": 2 * torch.ones(48, 16)}, ValueError, "must hold 0/1"),
])
def test_bad_profile_inputs_give_one_clear_error(kwargs, error, match):
    model, data = _encoder(), T.tokens(48, 16, seed=7)
    with pytest.raises(error, match=match):
        _profile(model, data, **kwargs)


def test_dict_with_inconsistent_rows_is_refused():
    data = T.tokens(48, 16)
    data["attention_mask"] = data["attention_mask"][:40]
    with pytest.raises(ValueError, match="inconsistent number of samples.*'input_ids' has 48, "
                       "'attention_mask' has 40"):
        _profile(_encoder(), data)


TORCHRUN_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
import ompq
from ompq.zoo import transformer as T
torch.manual_seed(0)
model = T.tiny_encoder().eval()
prof = ompq.profile(model, T.tokens(64, 16, seed=8), num_samples=48, batch_size=8,
                    progress=False)
rank = torch.distributed.get_rank()
torch.save({{"orm": prof.orm, "dist": prof.distortion.to_dict(), "layers": prof.names,
             "processes": prof.processes, "comm": prof.timings["comm"]}},
           {out!r} + str(rank) + ".pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow  # two torchrun processes
def test_torchrun_two_processes_give_the_one_process_orm(tmp_path):
    script = tmp_path / "run.py"
    script.write_text("import torch.distributed as dist\ndist.init_process_group('gloo')\n"
                      + TORCHRUN_SCRIPT.format(tests=os.path.dirname(__file__),
                                               out=str(tmp_path / "rank")))
    torchrun(str(script))
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(a["orm"], b["orm"]) and a["dist"] == b["dist"]  # every rank: the same
    assert a["processes"] == 2
    torch.manual_seed(0)
    one = ompq.profile(T.tiny_encoder().eval(), T.tokens(64, 16, seed=8), num_samples=48,
                       batch_size=8, progress=False)
    assert a["layers"] == one.names
    assert (a["orm"] - one.orm).abs().max() < 1e-6
    for name, row in one.distortion.output.items():
        assert a["dist"]["output"][name] == pytest.approx(row, rel=1e-6)


@pytest.mark.slow  # two torchrun processes running the CLI
def test_cli_profile_under_torchrun_rank0_writes(tmp_path):
    out = tmp_path / "prof.json"
    args = ["profile", "--model", "ompq.zoo.transformer:tiny_encoder", "--data",
            "ompq.zoo.transformer:tokens", "-n", "32", "--batch-size", "8", "--no-progress"]
    r = torchrun("-m", "ompq", *args, "--json", str(out))
    assert r.stdout.count("micro-batches of 8 over 2 processes") == 1  # rank 0 prints
    dp = ompq.Profile.from_json(out)
    single = tmp_path / "one.json"
    r = subprocess.run([sys.executable, "-m", "ompq", *args, "--json", str(single)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = ompq.Profile.from_json(single)
    assert dp.processes == 2 and one.processes == 1
    assert (dp.orm - one.orm).abs().max() < 1e-6
