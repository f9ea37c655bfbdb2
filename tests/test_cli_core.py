"""`ompq profile` / `ompq allocate` and the shared CLI helpers (ompq.cli)."""
import io
import textwrap
import warnings

import pytest
import torch

from ompq.allocate import BitConfig, load_bit_configs
from ompq.cli import main
from ompq.cli._common import print_table, resolve_data, resolve_model
from ompq.profile import Profile

NET_SOURCE = textwrap.dedent("""
    import torch.nn as nn

    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(6)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.relu(self.conv2(x))
            return self.fc(self.pool(self.dw(x)).flatten(1))

    def build():
        return TinyNet()

    NOT_A_MODEL = 3
""")
DATA = ["--data", "random:1,10,10", "--num-samples", "16", "--no-progress"]


@pytest.fixture
def netmod(tmp_path, monkeypatch):
    (tmp_path / "cli_tiny_net.py").write_text(NET_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cli_tiny_net"


def test_profile_command_table_and_json(netmod, tmp_path, capsys):
    path = tmp_path / "p.json"
    assert main(["profile", "--model", f"{netmod}:build", *DATA, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "gamma" in out and "conv2" in out and "forward" in out
    prof = Profile.from_json(path)
    assert prof.names == ["conv1", "conv2", "dw", "fc"] and prof.num_samples == 16
    assert prof.model == f"{netmod}:build"


def test_allocate_command_single_and_sweep(netmod, tmp_path, capsys):
    ppath = tmp_path / "p.json"
    assert main(["profile", "-m", f"{netmod}:build", *DATA, "--json", str(ppath)]) == 0
    capsys.readouterr()
    one = tmp_path / "one.json"
    assert main(["allocate", "--profile", str(ppath), "--size-mb", "0.002", "--pin", "fc=8",
                 "--tie", "conv2,dw", "--json", str(one)]) == 0
    out = capsys.readouterr().out
    assert "w_bits" in out and "OPTIMAL" in out
    (cfg,) = load_bit_configs(one)
    assert cfg.weight_bits["fc"] == 8 and cfg.weight_bits["conv2"] == cfg.weight_bits["dw"]
    assert cfg.size_mb <= 0.002
    sweep = tmp_path / "sweep.json"
    assert main(["allocate", "--profile", str(ppath), "--size-mb", "0.0012,0.002",
                 "--method", "lp-round", "--bits", "2,4,8", "--json", str(sweep)]) == 0
    cfgs = load_bit_configs(sweep)
    assert [c.budget["size_mb"] for c in cfgs] == [0.0012, 0.002]
    assert all(c.size_mb <= c.budget["size_mb"] for c in cfgs)
    assert all(set(c.weight_bits.values()) <= {2, 4, 8} for c in cfgs)


def test_json_to_stdout_is_pure_json(netmod, capsys):
    assert main(["allocate", "-m", f"{netmod}:build", *DATA, "--size-mb", "0.002",
                 "--json", "-"]) == 0
    cfg = BitConfig.from_json(capsys.readouterr().out)
    assert cfg.size_mb <= 0.002
    assert main(["profile", "-m", f"{netmod}:build", *DATA, "--json", "-"]) == 0
    assert Profile.from_json(capsys.readouterr().out).names[0] == "conv1"


def test_allocate_command_profiles_a_model(netmod, tmp_path, capsys):
    path = tmp_path / "c.json"
    assert main(["allocate", "-m", f"{netmod}:build", *DATA, "--bops-g", "0.03",
                 "--json", str(path)]) == 0
    cfg = BitConfig.from_json(path)
    assert cfg.bops_g <= 0.03 and cfg.status == "OPTIMAL"


def test_allocate_command_errors(netmod, tmp_path, capsys):
    ppath = tmp_path / "p.json"
    main(["profile", "-m", f"{netmod}:build", *DATA, "--json", str(ppath)])
    capsys.readouterr()
    assert main(["allocate", "--profile", str(ppath)]) == 2
    assert "give a budget" in capsys.readouterr().err
    assert main(["allocate", "--profile", str(ppath), "--size-mb", "1e-6"]) == 2
    err = capsys.readouterr().err
    assert "no bit assignment meets the budget" in err and "MiB" in err
    assert main(["allocate", "--profile", str(ppath), "--size-mb", "1", "--pin", "fc"]) == 2
    assert "PATTERN=BITS" in capsys.readouterr().err
    assert main(["allocate", "--profile", str(ppath), "--size-mb", "x"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err


def test_model_resolution_forms(netmod, tmp_path):
    model, desc = resolve_model(f"{netmod}:build")
    assert type(model).__name__ == "TinyNet" and not model.training
    saved = tmp_path / "net.pt"
    torch.save(model, saved)
    loaded, desc = resolve_model(str(saved))
    assert type(loaded).__name__ == "TinyNet" and desc == "net.pt"
    scripted = tmp_path / "net_ts.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(model).save(str(scripted))
    ts, _ = resolve_model(str(scripted))
    x = torch.randn(2, 1, 10, 10)
    with torch.no_grad():
        assert torch.allclose(ts(x), model(x))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="state_dict"):
        resolve_model(str(tmp_path / "sd.pt"))
    with pytest.raises(ValueError, match="module.path:factory"):
        resolve_model("no_such_zoo_model_xyz")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        resolve_model(f"{netmod}:nope")
    with pytest.raises(ValueError, match="not an nn.Module"):
        resolve_model(f"{netmod}:NOT_A_MODEL")
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_model("no_such_pkg_xyz.mod:build")


def test_profile_command_bad_model_is_a_clear_error(capsys):
    assert main(["profile", "--model", "no_such_zoo_model_xyz", *DATA]) == 2
    err = capsys.readouterr().err
    assert "a model is one of" in err and "saved model file" in err


def test_random_data_spec_and_errors():
    ds = resolve_data("random:1,4,4", seed=1)
    assert ds[0][0].shape == (1, 4, 4) and len(ds) == 256
    assert torch.equal(resolve_data("random:1x4x4", seed=1)[3][0], ds[3][0])
    with pytest.raises(ValueError, match="random:C,H,W"):
        resolve_data("random:a,b")


def test_main_help_and_commands(monkeypatch, capsys):
    import ompq.cli as cli

    assert main([]) == 2
    out = capsys.readouterr().out
    assert all(c in out for c in cli.COMMANDS)
    with pytest.raises(SystemExit):
        main(["--version"])
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ["zzz_missing"])
    with pytest.raises(ModuleNotFoundError):  # a listed command must exist
        cli.build_parser()


def test_print_table_alignment():
    buf = io.StringIO()
    print_table([("a", 1, 0.5), ("long.name", 12345, 0.25)], ["layer", "n", "x"], file=buf)
    lines = buf.getvalue().splitlines()
    assert lines[0].split() == ["layer", "n", "x"]
    assert lines[2].startswith("a ") and lines[3].split() == ["long.name", "12,345", "0.25"]
    assert len(lines[2]) == len(lines[3])
