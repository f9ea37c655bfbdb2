"""`ompq profile` / `ompq allocate` and the shared CLI helpers (`ompq.cli.common`): argument
types and the one bits range, defaults from the zoo, the error path, the module structure."""
import ast
import io
import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import ompq.cli as cli
from ompq import zoo
from ompq.bitconfig import BitConfig, load_bit_configs
from ompq.cli import common, main
from ompq.cli.common import print_table, resolve_data, resolve_model
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
    assert "--size-mb: 'x' is not a positive finite number" in capsys.readouterr().err


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


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(n in err for n in needles), err
    return err


@pytest.mark.parametrize("argv", [
    ["allocate", "--profile", "p.json", "--size-mb", "1", "--bits", "1,2"],
    ["quantize", "--size-mb", "0.1", "--bits", "2,17"],
    ["demo", "--bits", "4,x"],
    ["profile", "--distortion-bits", "2,40"],
])
def test_one_bits_range_everywhere(capsys, argv):
    """Every command takes candidate widths in the quantizers' range 2..16 and says so."""
    _one_line_error(capsys, argv, "--bits" if "--bits" in argv else "--distortion-bits",
                    "is not an integer in 2..16")


def test_single_bit_width_flags_use_the_same_range(capsys):
    _one_line_error(capsys, ["quantize", "--size-mb", "0.1", "--act-bits", "32"],
                    "--act-bits", "bit-width 32 is not an integer in 2..16")
    _one_line_error(capsys, ["allocate", "--size-mb", "1", "--pin", "fc=1"], "--pin",
                    "bit-width 1 is not an integer in 2..16")
    assert common.bits_list("8, 2,4,4") == (2, 4, 8)
    assert common.distortion_bits("none") is None


def test_bad_flags_are_one_line_with_the_command(capsys):
    err = _one_line_error(capsys, ["quantize", "--mode", "int8"], "--mode", "invalid choice")
    assert err.startswith("ompq quantize: error:")
    _one_line_error(capsys, ["eval", "--limit", "0"], "--limit", "an integer >= 1")
    _one_line_error(capsys, ["quantize", "--size-mb", "-2"], "--size-mb",
                    "-2.0 is not a positive finite number")
    _one_line_error(capsys, ["no-such-command"], "invalid choice")


def test_interrupt_exits_130_with_one_line(monkeypatch, capsys):
    import ompq.cli.eval as eval_cmd

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cmd, "run", interrupted)
    assert main(["eval", "--no-progress"]) == 130
    assert capsys.readouterr().err.strip() == "ompq eval: interrupted; nothing was left half-written"


def test_defaults_come_from_the_zoo():
    parser = cli.build_parser()
    minimal = {"demo": [], "quantize": [], "eval": [], "export": ["--packed", "x.ompq"],
               "profile": [], "allocate": []}
    for name, extra in minimal.items():
        args = parser.parse_args([name, *extra])
        assert args.model == zoo.DEFAULT_MODEL, name
        assert getattr(args, "data", getattr(args, "check_data", None)) is None, name
    assert common.data_spec(None, zoo.DEFAULT_MODEL) == zoo.info(zoo.DEFAULT_MODEL)["dataset"]
    assert common.data_spec(None, "mobilenetv2") == zoo.info("mobilenetv2")["dataset"]
    assert common.data_spec(None, "mypkg.nets:build") == common.FALLBACK_DATA
    assert common.data_spec("random:1,8,8", "resnet20") == "random:1,8,8"
    assert resolve_model(None)[1] == zoo.DEFAULT_MODEL


def test_command_modules_import_only_common():
    """One helper module: command modules import `ompq.cli.common` and library modules, never
    another command's module nor private names; `_common.py` is gone."""
    folder = Path(cli.__file__).parent
    assert not (folder / "_common.py").exists()
    for name in cli.COMMANDS:
        tree = ast.parse((folder / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module == "common", (name, node.module)
            if isinstance(node, ast.ImportFrom):
                assert not any(a.name.startswith("_") for a in node.names), (name, node.module)
        top = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"add_parser", "run"} <= top, name


def test_eval_json_to_stdout_is_pure_json(netmod, capsys):
    assert main(["eval", "-m", f"{netmod}:build", "--data", "random:1,10,10", "--limit", "32",
                 "--no-progress", "--json", "-"]) == 0
    out = capsys.readouterr().out
    rec = json.loads(out)
    assert rec["n"] == 32 and rec["method"] == "fp32" and rec["data"] == "random:1,10,10"
