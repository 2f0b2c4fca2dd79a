from __future__ import annotations

import math

import pytest
import torch

from mbbo.ranking.neumf import NeuMF


def _model(seed: int = 0, **kw) -> NeuMF:
    return NeuMF(50, 80, generator=torch.Generator().manual_seed(seed), **kw)


def test_architecture_and_shapes():
    m = _model()
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "mf_u.weight": (50, 64),
        "mf_i.weight": (80, 64),
        "mlp_u.weight": (50, 64),
        "mlp_i.weight": (80, 64),
        "mlp.0.weight": (64, 128),
        "mlp.0.bias": (64,),
        "prediction.weight": (1, 128),
    }
    assert m.prediction.bias is None
    assert [type(x).__name__ for x in m.mlp] == ["Linear", "ReLU", "Dropout"] and m.mlp[2].p == 0.2
    assert m.out_dropout.p == 0.0  # the reference architecture: dropout inside the MLP only
    assert NeuMF(50, 80, output_dropout=0.2).out_dropout.p == 0.2  # mbbo's earlier extra dropout, on request
    users = torch.tensor([0, 3, 49])
    assert m.score(users, torch.tensor([1, 2, 79])).shape == (3,)
    assert m(users, torch.randint(0, 80, (3, 7))).shape == (3, 7)
    assert m.score_all_items(users).shape == (3, 80)


def test_initialisation_statistics():
    m = NeuMF(2000, 3000, generator=torch.Generator().manual_seed(1))
    flat = torch.cat([p.detach().flatten() for p in m.parameters()])
    assert abs(flat.mean().item()) < 2e-4
    assert flat.std().item() == pytest.approx(0.01, rel=0.01)
    for name, p in m.named_parameters():  # every tensor, including the bias and the head, is N(0, 0.01^2)
        assert p.std().item() == pytest.approx(0.01, rel=0.35), name


def test_seed_determinism():
    a, b, c = _model(3), _model(3), _model(4)
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), n
        assert not torch.equal(pa, pc), n


def test_score_all_items_equals_pairwise_scores():
    m = _model().double().eval()
    users = torch.tensor([4, 0, 17, 4])
    pairwise = m.score(users, torch.arange(80).expand(4, -1))
    torch.testing.assert_close(m.score_all_items(users), pairwise, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m.score_all_items(users, max_elements=64 * 4 * 3), pairwise, rtol=1e-12, atol=1e-14)
    assert m.score_all_items(users).dtype == torch.float64
    # deeper MLP too
    deep = NeuMF(5, 9, emb_size=8, layers=(16, 4), generator=torch.Generator().manual_seed(0)).eval()
    u = torch.arange(5)
    torch.testing.assert_close(deep.score_all_items(u), deep.score(u, torch.arange(9).expand(5, -1)))


def test_dropout_only_in_training_mode():
    m = _model(dropout=0.5)
    m.train()
    users, items = torch.arange(10), torch.arange(10)
    torch.manual_seed(0)
    a = m.score(users, items)
    b = m.score(users, items)
    assert not torch.equal(a, b)
    m.eval()
    assert torch.equal(m.score(users, items), m.score(users, items))
    m.train()
    torch.manual_seed(0)
    assert m.score_all_items(users).shape == (10, 80)  # training-mode path (per-pair dropout)


@pytest.mark.parametrize("init", ["torch", "normal"])
def test_reset_head_changes_only_the_head(init):
    m = _model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.reset_head(torch.Generator().manual_seed(9), init=init)
    for n, p in m.named_parameters():
        if n == "prediction.weight":
            assert not torch.equal(p, before[n])
        else:
            assert torch.equal(p, before[n]), n
    w = m.prediction.weight
    if init == "torch":
        bound = 1 / math.sqrt(128)
        assert w.abs().max().item() <= bound and w.abs().max().item() > 0.5 * bound
    else:
        assert w.std().item() == pytest.approx(0.01, rel=0.4)
    m2 = _model()
    m2.reset_head(torch.Generator().manual_seed(9), init=init)
    assert torch.equal(m2.prediction.weight, w)
    with pytest.raises(ValueError, match="init"):
        m.reset_head(init="xavier")  # type: ignore[arg-type]


def test_validation():
    with pytest.raises(ValueError, match="sizes"):
        NeuMF(0, 5)
    with pytest.raises(ValueError, match="dropout"):
        NeuMF(3, 5, dropout=1.0)
    with pytest.raises(ValueError, match="layers"):
        NeuMF(3, 5, layers=())


def test_gradients_flow_to_every_parameter():
    m = _model()
    m.score(torch.tensor([1, 2]), torch.tensor([[3, 4], [5, 6]])).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
