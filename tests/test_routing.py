"""Routing variants: exact rules on hand-made inputs, the module paths, training and save/load."""

from __future__ import annotations

import pytest
import torch

from mixtral_lite import Mixtral, MixtralConfig
from mixtral_lite.config import ConfigError
from mixtral_lite.model.experts import StackedExperts, experts_reference
from mixtral_lite.model.mixtral import FeedForward, SparseMoE
from mixtral_lite.model.routing import (
    expert_capacity,
    expert_load,
    experts_dense,
    experts_padded,
    fine_grained,
    hard_kept_reference,
    route_hard,
    route_hierarchical,
    route_scores,
    route_soft,
    route_topk,
    update_bias,
)
from mixtral_lite.params import count_parameters
from mixtral_lite.training.losses import load_stats

VARIANTS = {
    "mixtral": {},
    "dense": {"first_k_dense": 2, "dense_intermediate_size": 96},
    "hard": {"kind": "hard", "num_experts_per_tok": 1, "capacity_factor": 1.0},
    "soft": {"kind": "soft"},
    "hierarchical": {"kind": "hierarchical", "num_groups": 2, "top_k_groups": 1, "num_experts_per_tok": 2},
    "deepseek": {
        "num_experts": 8,
        "num_experts_per_tok": 3,
        "n_shared_experts": 1,
        "score_func": "sigmoid",
        "bias_balancing": True,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "first_k_dense": 1,
    },
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def variant_config(name: str, **overrides) -> MixtralConfig:
    data = MixtralConfig.from_preset("tiny").to_dict()
    data["vocab_size"] = 96
    data["moe"] = {**data["moe"], **VARIANTS[name]}
    data.update(overrides)
    return MixtralConfig.from_dict(data)


def make_model(name: str, seed: int = 0) -> Mixtral:
    model = Mixtral(variant_config(name))
    model.reset_parameters(std=0.1, generator=torch.Generator().manual_seed(seed))
    return model


# ---- routing rules ------------------------------------------------------------------------------
def test_route_scores_defaults_equal_mixtral_router():
    logits = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    idx, weights = route_topk(logits, 2)
    r = route_scores(logits, 2)
    assert torch.equal(r.idx, idx)
    assert torch.allclose(r.weights, weights, atol=1e-7, rtol=0)


def test_hard_capacity_drops_exact_on_hand_made_routing():
    # 10 tokens, 4 experts, factor 1.0 -> capacity ceil(10 / 4) = 3.
    choice = [0, 0, 1, 0, 0, 2, 0, 1, 2, 2]
    logits = torch.full((10, 4), -5.0)
    logits[torch.arange(10), torch.tensor(choice)] = 5.0
    r = route_hard(logits, 1.0)
    assert r.capacity == 3
    assert r.idx[:, 0].tolist() == choice
    # expert 0 gets tokens 0, 1, 3 then drops 4 and 6; experts 1 and 2 stay within 3.
    assert r.kept.tolist() == [True, True, True, True, False, True, False, True, True, True]
    assert r.dropped == 2
    assert r.weights[~r.kept].abs().max().item() == 0.0
    p = torch.softmax(logits, -1).max(-1).values
    assert torch.equal(r.weights[r.kept, 0], p[r.kept])


@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25, 2.0])
def test_hard_capacity_matches_reference_loop(factor):
    logits = torch.randn(257, 8, generator=torch.Generator().manual_seed(1)) + torch.linspace(0, 2, 8)
    r = route_hard(logits, factor)
    cap = expert_capacity(257, 8, factor)
    assert r.capacity == cap
    assert r.kept.tolist() == hard_kept_reference(r.idx[:, 0].tolist(), 8, cap)


def test_hard_module_zeroes_dropped_tokens_in_training_only():
    torch.manual_seed(0)
    moe = SparseMoE(variant_config("hard"))
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.weight[0] += 2.0  # skew: most tokens want expert 0
    moe.record_routing = True
    x = torch.randn(1, 40, 64)
    moe.train()
    y, _ = moe(x)
    r = moe.last_routing
    assert r.dropped > 0 and r.capacity == 10
    assert y[0, ~r.kept].abs().max().item() == 0.0
    assert y[0, r.kept].abs().min().item() > 0.0
    moe.eval()
    y_eval, _ = moe(x)
    assert moe.last_routing.kept is None and y_eval.abs().sum(-1).min().item() > 0.0


def test_soft_dense_mixture_matches_reference():
    g = torch.Generator().manual_seed(2)
    e, d, i, n = 4, 16, 24, 9
    x = torch.randn(n, d, generator=g)
    w1, w3 = torch.randn(e, i, d, generator=g), torch.randn(e, i, d, generator=g)
    w2 = torch.randn(e, d, i, generator=g)
    r = route_soft(torch.randn(n, e, generator=g))
    assert r.idx.shape == (n, e) and torch.allclose(r.weights.sum(-1), torch.ones(n))
    ref = experts_reference(x, StackedExperts(w1, w2, w3), r.idx, r.weights)
    assert (experts_dense(x, w1, w2, w3, r.weights) - ref).abs().max().item() < 1e-4


def test_hierarchical_weights_are_product_of_gates():
    g = torch.Generator().manual_seed(3)
    group_logits, logits = torch.randn(5, 2, generator=g), torch.randn(5, 6, generator=g)
    p_group = torch.softmax(group_logits, -1)
    p_in = torch.softmax(logits.view(5, 2, 3), -1)
    # Every group and expert chosen: exactly the full two-level mixture (Jordan & Jacobs).
    full = route_hierarchical(group_logits, logits, k=3, top_k_groups=2)
    dense = torch.zeros(5, 6).scatter(1, full.idx, full.weights)
    assert torch.allclose(dense, (p_group[..., None] * p_in).reshape(5, 6), atol=1e-7)
    assert torch.allclose(full.probs.sum(-1), torch.ones(5), atol=1e-6)
    # Top-1 group, top-2 inside: weight = p_group * (renormalised in-group weight).
    r = route_hierarchical(group_logits, logits, k=2, top_k_groups=1)
    for n in range(5):
        grp = int(p_group[n].argmax())
        w, local = p_in[n, grp].topk(2)
        assert r.idx[n].tolist() == (grp * 3 + local).tolist()
        assert torch.allclose(r.weights[n], p_group[n, grp] * w / w.sum(), atol=1e-7)


def test_group_limited_routing_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(64, 12, generator=g)
    bias = torch.randn(12, generator=g) * 0.1
    r = route_scores(logits, 3, score_func="sigmoid", bias=bias, n_group=4, topk_group=2, scaling=2.0)
    s = torch.sigmoid(logits)
    sel = s + bias
    for n in range(64):
        group_score = [sorted(sel[n, 3 * j : 3 * j + 3].tolist())[-2:] for j in range(4)]
        keep = sorted(range(4), key=lambda j: -sum(group_score[j]))[:2]
        allowed = [e for e in range(12) if e // 3 in keep]
        best = sorted(allowed, key=lambda e: -sel[n, e].item())[:3]
        assert sorted(r.idx[n].tolist()) == sorted(best)
        w = s[n, r.idx[n]]
        assert torch.allclose(r.weights[n], 2.0 * w / w.sum(), atol=1e-6)


def test_bias_balancing_reduces_max_vio_on_skewed_router():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2048, 8, generator=g) + torch.tensor([2.0, 1.0, 0.5, 0, 0, 0, 0, 0])  # skewed router
    bias = torch.zeros(8)
    before = load_stats(expert_load(route_scores(logits, 2, score_func="sigmoid", bias=bias).idx, 8)).max_vio
    for _ in range(300):
        r = route_scores(logits, 2, score_func="sigmoid", bias=bias)
        update_bias(bias, expert_load(r.idx, 8), 1e-3)
    after = load_stats(expert_load(route_scores(logits, 2, score_func="sigmoid", bias=bias).idx, 8)).max_vio
    assert before > 2.0  # expert 0 takes > 3x its fair share
    assert after < 0.05, (before, after)  # measured 2.23 -> 0.008
    # the bias selects only: the weights are still the normalised sigmoid scores
    s = torch.sigmoid(logits).gather(1, r.idx)
    assert torch.allclose(r.weights, s / s.sum(-1, keepdim=True), atol=1e-6)


def test_fine_grained_keeps_active_parameters():
    base = variant_config("mixtral", intermediate_size=128)
    fine = fine_grained(base, 4, n_shared=1)
    assert (fine.num_experts, fine.num_experts_per_tok, fine.intermediate_size) == (15, 7, 32)
    assert fine.moe.n_shared_experts == 1
    a, b = count_parameters(base), count_parameters(fine)
    assert a.active_breakdown["experts"] == b.active_breakdown["experts"] + b.active_breakdown["shared_experts"]


@pytest.mark.parametrize(
    "moe, match",
    [
        ({"kind": "soft", "score_func": "sigmoid"}, "DeepSeek options"),
        ({"num_experts": 8, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 1}, "topk_group"),
        ({"routed_scaling_factor": 0.0}, "routed_scaling_factor"),
    ],
)
def test_variant_config_errors(moe, match):
    with pytest.raises(ConfigError, match=match):
        MixtralConfig.from_dict({"moe": moe})


# ---- every variant in the model -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_on_fixed_batch(name):
    torch.manual_seed(0)
    model = make_model(name)
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if "gate" in n), name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_variant_modules_exist():
    model = make_model("deepseek")
    assert isinstance(model.layers[0].feed_forward, FeedForward)
    moe = model.layers[1].feed_forward
    assert moe.shared.w1.weight.shape == (128, 64) and moe.expert_bias.shape == (8,)
    assert make_model("hierarchical").layers[0].feed_forward.group_gate.weight.shape == (2, 64)
    count_parameters(model)  # raises when the config count and the tensors disagree


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_save_load_identical_logits(name, tmp_path):
    from mixtral_lite.cpu import install_cpu_kernels
    from mixtral_lite.weights.loading import load_model
    from mixtral_lite.weights.saving import save_pretrained

    model = make_model(name, seed=3).eval()
    if name == "deepseek":
        with torch.no_grad():
            model.layers[1].feed_forward.expert_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    save_pretrained(model, tmp_path)
    loaded = load_model(tmp_path)
    install_cpu_kernels(model)  # as the loader does: the same products on both sides
    assert loaded.config == model.config
    ids = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    if name == "deepseek":
        assert torch.equal(loaded.layers[1].feed_forward.expert_bias, model.layers[1].feed_forward.expert_bias)


def _reference(x, w1, w2, w3, idx, weights):
    return experts_reference(x, StackedExperts(w1, w2, w3), idx, weights)


def test_experts_padded_matches_reference_values_and_gradients():
    g = torch.Generator().manual_seed(6)
    e, d, i, n, k = 6, 8, 12, 20, 3
    params = [torch.randn(s, generator=g, requires_grad=True) for s in ((e, i, d), (e, d, i), (e, i, d))]
    x = torch.randn(n, d, generator=g, requires_grad=True)
    idx = torch.rand(n, e, generator=g).topk(k, -1).indices
    idx[idx == 5] = 4  # expert 5 gets no token
    weights = torch.rand(n, k, generator=g)
    outs, grads = [], []
    for fn in (experts_padded, _reference):
        y = fn(x, *params, idx, weights)
        (y * torch.linspace(-1, 1, d)).sum().backward()
        outs.append(y.detach())
        grads.append([t.grad.clone() for t in (x, *params)])
        for t in (x, *params):
            t.grad = None
    assert (outs[0] - outs[1]).abs().max().item() < 1e-5
    for a, b in zip(*grads, strict=True):
        assert (a - b).abs().max().item() < 1e-4
    assert grads[0][1][5].abs().max().item() == 0.0
