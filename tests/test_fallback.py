"""Without the compiled extension ompq still imports, warns once, and uses the reference ops."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys, warnings

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "ompq._C":
                raise ImportError("blocked by the test")
            return None

    sys.meta_path.insert(0, Block())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import ompq
        import ompq.ops
        import ompq.profile, ompq.allocate, ompq.ptq  # noqa: F401  (no second warning)
    msgs = [str(w.message) for w in caught if "compiled extension" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "pip install --no-build-isolation -e ." in msgs[0]
    assert not ompq.ops.HAS_EXTENSION and not ompq.ops.has_op("fake_quant")

    import torch
    from ompq import reference
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    s, z = torch.tensor([0.05]), torch.tensor([0.0])
    assert torch.equal(ompq.ops.fake_quant(x, s, z, -8, 7), reference.fake_quant(x, s, z, -8, 7))
    assert torch.equal(ompq.ops.centered_gram(x), reference.centered_gram(x))
    codes = torch.randint(0, 16, (3, 10), generator=torch.Generator().manual_seed(1))
    packed = ompq.ops.pack_rows(codes, 4)
    assert torch.equal(packed, reference.pack_rows(codes, 4))
    sc, of = torch.full((3,), 0.1), torch.full((3,), 8.0)
    w = torch.empty(3, 10)
    ompq.ops.unpack_rows(packed, 4, 10, sc, of, w)
    assert torch.equal(w, (codes.float() - 8.0) * 0.1)
    assert torch.allclose(ompq.ops.packed_linear(x[:, :10], packed, 4, 10, sc, of), x[:, :10] @ w.T)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    prof = ompq.profile(model, torch.randn(32, 16), num_samples=16, progress=False)
    cfg = ompq.allocate(prof, size_mb=4 * (16 * 8 + 8 * 4) / 8 / 2 ** 20, bits=(2, 4, 8))
    assert cfg.size_mb <= 4 * (16 * 8 + 8 * 4) / 8 / 2 ** 20
    print("fallback ok")
""")


def test_imports_and_works_without_the_compiled_extension():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fallback ok" in out.stdout
