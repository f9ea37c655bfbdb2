"""ORM (linear CKA) and its debiased variant (ompq.orm)."""
import pytest
import torch
from torch import nn

from ompq import ops, reference
from ompq.orm import feature_gram, orm_from_grams, orm_matrix, u_center


def cka_pairwise(feats):
    """Plain reference: feature-space form ‖YᵀX‖² / (‖XᵀX‖ ‖YᵀY‖), float64, a double loop."""
    xs = [f.reshape(f.shape[0], -1).double() for f in feats]
    xs = [x - x.mean(0) for x in xs]
    out = torch.empty(len(xs), len(xs), dtype=torch.float64)
    for i, a in enumerate(xs):
        for j, b in enumerate(xs):
            out[i, j] = (b.T @ a).square().sum() / (
                torch.linalg.norm(a.T @ a) * torch.linalg.norm(b.T @ b))
    return out


def hsic_unbiased(k, l):
    """Song et al. (2007) unbiased HSIC from raw (uncentred) Grams."""
    n = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)
    one = torch.ones(n, dtype=k.dtype)
    term = (k * l).sum() + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) \
        - 2.0 / (n - 2) * (one @ k @ l @ one)
    return term / (n * (n - 3))


def debiased_pairwise(feats):
    grams = [f.reshape(f.shape[0], -1).double() @ f.reshape(f.shape[0], -1).double().T
             for f in feats]
    out = torch.empty(len(grams), len(grams), dtype=torch.float64)
    for i, a in enumerate(grams):
        for j, b in enumerate(grams):
            out[i, j] = hsic_unbiased(a, b) / torch.sqrt(hsic_unbiased(a, a) * hsic_unbiased(b, b))
    return out


def random_features(gen, n=24, dims=(5, 40, 7, 300), dtype=torch.float32):
    base = torch.randn(n, 6, generator=gen)
    feats = []
    for d in dims:  # mix of shared and private structure so ORM values spread over (0, 1)
        mix = torch.randn(6, d, generator=gen)
        feats.append((base @ mix + 0.7 * torch.randn(n, d, generator=gen) + 3.0).to(dtype))
    feats.append(torch.randn(n, 2, 3, 4, generator=gen).to(dtype))  # N×… is flattened
    return feats


def assert_rel_close(a, b, rel=1e-5):
    assert torch.allclose(a, b, rtol=rel, atol=rel * 1e-3), (a - b).abs().max()


def test_orm_matches_pairwise_reference_fp32_and_fp64(gen):
    feats = random_features(gen)
    ref = cka_pairwise(feats)
    assert_rel_close(orm_matrix(feats), ref)
    assert_rel_close(orm_matrix([f.double() for f in feats]), ref, rel=1e-10)


def test_orm_properties(gen):
    feats = random_features(gen, dims=(8, 30, 12))
    orm = orm_matrix(feats)
    assert orm.dtype == torch.float64 and orm.shape == (4, 4)
    assert torch.equal(orm.diagonal(), torch.ones(4, dtype=torch.float64))
    assert torch.equal(orm, orm.T)
    assert bool(((orm >= 0) & (orm <= 1)).all())
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    moved = [feats[0] * 37.5, (feats[1].double() @ q).float() - 4.0, feats[2] * 1e-3,
             feats[3]]
    assert_rel_close(orm_matrix(moved), orm, rel=1e-4)


def test_orm_on_a_real_model_matches_reference(gen):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 7 * 7, 10)).eval()
    feats = []
    hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o.detach().clone()))
             for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(torch.randn(20, 3, 16, 16, generator=gen))
    for h in hooks:
        h.remove()
    assert_rel_close(orm_matrix(feats), cka_pairwise(feats))


def test_debiased_matches_u_statistic(gen):
    feats = random_features(gen, n=12, dims=(4, 20, 9))
    ref = debiased_pairwise(feats)
    assert_rel_close(orm_matrix([f.double() for f in feats], debiased=True), ref, rel=1e-9)
    assert_rel_close(orm_matrix(feats, debiased=True), ref, rel=1e-4)
    diag = orm_matrix(feats, debiased=True).diagonal()
    assert torch.equal(diag, torch.ones(4, dtype=torch.float64))


def test_u_center_zero_diagonal_and_row_sums(gen):
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    u = u_center(x @ x.T)
    assert torch.equal(u.diagonal(), torch.zeros(7, dtype=torch.float64))
    assert torch.allclose(u.sum(1), torch.zeros(7, dtype=torch.float64), atol=1e-12)


def test_orm_from_grams_equals_orm_matrix(gen):
    feats = random_features(gen)
    grams = torch.stack([feature_gram(f) for f in feats])
    assert torch.allclose(orm_from_grams(grams), orm_matrix(feats), rtol=0, atol=1e-12)


def test_compiled_gram_matches_reference(gen):
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(16, 333, generator=gen) + 2).to(dtype)
        assert torch.allclose(ops.centered_gram(x), reference.centered_gram(x), rtol=1e-4,
                              atol=1e-3)


def test_constant_feature_warns_and_gives_zero_row(gen):
    feats = random_features(gen, dims=(5, 9))
    feats[1] = torch.full((24, 9), 2.5)
    with pytest.warns(RuntimeWarning, match="layer 'b' has a constant feature"):
        orm = orm_matrix(feats, names=["a", "b", "c"])
    assert not torch.isnan(orm).any()
    assert orm[1, 1] == 1 and orm[1, 0] == 0 and orm[2, 1] == 0
    with pytest.warns(RuntimeWarning, match="constant feature"):
        orm_matrix([torch.zeros(8, 3), torch.randn(8, 3, generator=gen)], debiased=True)


@pytest.mark.parametrize("bad, match", [
    ([torch.randn(6, 3), torch.tensor([[float("nan")]] * 6)], "feature 'l1' has non-finite"),
    ([torch.randn(6, 3), torch.full((6, 2), float("inf"))], "feature 'l1' has non-finite"),
    ([torch.randn(3, 3), torch.randn(3, 3)], "at least 4 samples"),
    ([torch.randn(6, 3), torch.randn(5, 3)], "feature 'l1' has shape \\(5, 3\\)"),
    ([], "at least one feature"),
    ([torch.randn(6, 3), [1, 2]], "feature 'l1' must be a tensor"),
])
def test_orm_matrix_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        orm_matrix(bad, names=["l0", "l1"][:len(bad)] if bad else None)


def test_orm_from_grams_errors():
    with pytest.raises(ValueError, match="L×N×N"):
        orm_from_grams(torch.zeros(3, 4))
    g = torch.eye(5).repeat(2, 1, 1)
    g[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="layer 'y' has a non-finite feature"):
        orm_from_grams(g, names=["x", "y"])


@pytest.mark.parametrize("shape, fmt", [((6, 5, 4, 3), torch.channels_last),
                                        ((6, 5, 4, 3, 2), torch.channels_last_3d)])
def test_flatten_samples_is_a_view_for_channels_last(shape, fmt):
    from ompq.orm import feature_gram, flatten_samples
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).relu() + 1.0
    xc = x.contiguous(memory_format=fmt)
    flat = flatten_samples(xc)
    assert flat.shape == (shape[0], x[0].numel())
    assert flat.data_ptr() == xc.data_ptr()  # no copy
    torch.testing.assert_close(feature_gram(xc), feature_gram(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feature_gram(xc.double()), feature_gram(x.double()), rtol=1e-12,
                               atol=1e-12)
