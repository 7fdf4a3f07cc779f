"""Balance losses against transformers and hand computations; load metrics on hand-made loads."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from mixtral_lite import Mixtral, MixtralConfig
from mixtral_lite.model.routing import Routing, route_hard, route_scores, route_soft
from mixtral_lite.training.losses import (
    deepseek_balance_loss,
    importance_loss,
    layer_stats,
    load_balancing_loss,
    load_stats,
    summarize,
    switch_loss,
    z_loss,
)


@pytest.mark.parametrize("e, k, layers", [(8, 2, 3), (4, 1, 1), (6, 3, 2), (16, 4, 4)])
def test_aux_loss_equals_transformers(e, k, layers):
    g = torch.Generator().manual_seed(e * 10 + k)
    logits = tuple(torch.randn(37, e, generator=g) * 2 for _ in range(layers))
    expected = load_balancing_loss_func(logits, e, k)
    got = load_balancing_loss(logits, e, k)
    assert abs(got.item() - expected.item()) <= 1e-6 * expected.item()


def test_aux_loss_from_model_routing_equals_transformers_and_has_gradient():
    config = MixtralConfig.from_preset("tiny")
    model = Mixtral(config)
    model.reset_parameters(std=0.1, generator=torch.Generator().manual_seed(0))
    for layer in model.layers:
        layer.feed_forward.record_routing = True
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    out = model(ids, return_router_logits=True)
    routings = [layer.feed_forward.last_routing for layer in model.layers]
    expected = load_balancing_loss_func(out.router_logits, 4, 2)
    got = switch_loss(routings)
    assert abs(got.item() - expected.item()) <= 1e-6 * expected.item()
    got.backward()
    assert model.layers[0].feed_forward.gate.weight.grad.abs().sum().item() > 0


def test_aux_loss_is_k_when_balanced():
    # Every token: uniform probabilities, and the K choices rotate through the experts.
    e, k, n = 4, 2, 8
    idx = torch.tensor([[(2 * i) % e, (2 * i + 1) % e] for i in range(n)])
    probs = torch.full((n, e), 1 / e)
    r = Routing(torch.zeros(n, e), idx, torch.full((n, k), 0.5), probs)
    assert switch_loss([r]).item() == pytest.approx(k, abs=1e-6)
    assert deepseek_balance_loss([r]).item() == pytest.approx(1.0, abs=1e-6)
    assert importance_loss([r]).item() == pytest.approx(0.0, abs=1e-12)


def test_deepseek_loss_by_hand():
    # 4 tokens, 4 experts, K=1: counts [3, 1, 0, 0]; f_i = E / (K N) * count_i = [3, 1, 0, 0].
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1]])
    idx = torch.tensor([[0], [0], [0], [1]])
    r = Routing(probs.log(), idx, torch.ones(4, 1), probs)
    p_mean = probs.mean(0)
    assert deepseek_balance_loss([r]).item() == pytest.approx(3 * p_mean[0].item() + 1 * p_mean[1].item(), abs=1e-6)
    # Switch pools layers and scales by E: E * sum (count/N) P = 4 * (0.75 P0 + 0.25 P1).
    assert switch_loss([r]).item() == pytest.approx(4 * (0.75 * p_mean[0] + 0.25 * p_mean[1]).item(), abs=1e-6)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    r = Routing(logits, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert z_loss([r]).item() == pytest.approx(expected, abs=1e-6)


def test_sigmoid_routing_probs_sum_to_one():
    r = route_scores(torch.randn(10, 6), 2, score_func="sigmoid")
    assert torch.allclose(r.routing_probs().sum(-1), torch.ones(10), atol=1e-6)


def test_load_stats_by_hand():
    s = load_stats(torch.tensor([3.0, 1.0, 0.0, 0.0]))
    assert s.share == [0.75, 0.25, 0.0, 0.0]
    assert s.max_vio == pytest.approx(2.0)  # (3 - 1) / 1
    assert s.cv == pytest.approx(math.sqrt(((2**2) + 0 + 1 + 1) / 4))  # std 1.2247 / mean 1
    assert load_stats(torch.ones(8)).max_vio == 0.0


def test_layer_stats_counts_drops_and_soft_weight_mass():
    choice = [0, 0, 0, 0, 1, 2, 3, 0]
    logits = torch.full((8, 4), -5.0)
    logits[torch.arange(8), torch.tensor(choice)] = 5.0
    hard = route_hard(logits, 1.0)  # capacity 2: expert 0 keeps 2 of its 5
    [s] = layer_stats([hard])
    assert s.dropped == 3 / 8
    assert s.share == [5 / 8, 1 / 8, 1 / 8, 1 / 8]
    soft = route_soft(torch.tensor([[2.0, 0.0], [2.0, 0.0]]))
    [t] = layer_stats([soft])
    p = torch.softmax(torch.tensor([2.0, 0.0]), -1)
    assert t.share == pytest.approx(p.tolist()) and t.max_vio == pytest.approx((p[0] / 0.5 - 1).item())
    summary = summarize([s, t])
    assert summary["dropped"] == pytest.approx(3 / 16)
    assert summary["max_vio_worst"] == pytest.approx(max(s.max_vio, t.max_vio))
