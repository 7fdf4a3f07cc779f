"""The one-call decoder layer (``native_layer.py``, ``csrc/layer.c``): its router chooses the
experts ``route_topk`` chooses (ties included), the layer equals the two fused halves it
replaces, its plan follows weight changes, and it is skipped where it does not apply."""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch
from torch import nn

from mixtral_lite import MixtralConfig
from mixtral_lite.cpu import build, install_cpu_kernels, modules, native
from mixtral_lite.cpu.layer import LAYER_MAX_ROWS, LayerPlan, native_route
from mixtral_lite.model import mixtral as model
from mixtral_lite.model import quant
from mixtral_lite.model.cache import KVCache
from mixtral_lite.model.routing import route_topk

pytestmark = pytest.mark.skipif(not build.available(), reason="native kernel unavailable here")
DTYPES = [torch.float32, torch.bfloat16]


def _check_route(logits: torch.Tensor, k: int) -> None:
    idx, w = native_route(logits, k)
    ref_idx, ref_w = route_topk(logits, k)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, rtol=2e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_breaks_ties_as_torch_topk(dtype: torch.dtype) -> None:
    """Every pattern of 8 logits from {0, 1, 2} (6561 rows full of ties), top-1, 2 and 3."""
    rows = torch.tensor(list(itertools.product(range(3), repeat=8)), dtype=torch.float32).to(dtype)
    for k in (1, 2, 3):
        _check_route(rows, k)


@pytest.mark.parametrize("e_k", [(4, 1), (6, 2), (16, 4), (60, 6), (64, 2), (127, 2), (40, 17)])
def test_router_matches_route_topk(e_k: tuple[int, int]) -> None:
    """Other expert counts: few distinct values (ties), plain random logits, a row with NaN."""
    e, k = e_k
    g = torch.Generator().manual_seed(e * 100 + k)
    _check_route(torch.randint(0, 4, (3000, e), generator=g).float(), k)
    _check_route(torch.randn(3000, e, generator=g), k)
    _check_route(torch.randn(300, e, generator=g).bfloat16(), k)
    nan = torch.randn(2, e, generator=g)
    nan[0, e // 2] = float("nan")
    _check_route(nan, k)


def test_router_rejects_what_topk_selects_otherwise() -> None:
    logits = torch.randn(2, 128)
    with pytest.raises(ValueError, match="top-2 of 128"):
        native_route(logits, 2)  # torch.topk sorts partially there: not replicated
    with pytest.raises(ValueError, match="top-18"):
        native_route(torch.randn(2, 40), 18)


def _decoder(
    dtype: torch.dtype, int8: bool, seed: int = 0, mode: str | None = None
) -> tuple[model.Mixtral, MixtralConfig]:
    """The tiny model, quantised to int8 (or to ``mode``, int4 in groups of 32), kernels installed."""
    config = MixtralConfig.from_preset("tiny")
    torch.manual_seed(seed)
    net = model.Mixtral(config).to(dtype).eval()
    if int8 or mode:
        quant.quantize_model(net, mode or "int8", group_size=32)
    install_cpu_kernels(net)
    return net, config


def _with_history(config: MixtralConfig, b: int, dtype: torch.dtype) -> KVCache:
    cache = KVCache(config, b, 16, dtype=dtype)
    for layer in range(config.num_hidden_layers):
        cache.k[layer].normal_(generator=torch.Generator().manual_seed(layer))
        cache.v[layer].normal_(generator=torch.Generator().manual_seed(layer + 50))
    return cache


def _step(block: model.Block, config: MixtralConfig, x: torch.Tensor, cache: KVCache, pos: int):
    b = x.shape[0]
    positions = torch.full((b, 1), pos)
    cos, sin = model.rotary_cos_sin(positions, model.inverse_frequencies(config.head_dim, config.rope_theta), x.dtype)
    keep = torch.arange(cache.max_seq_len) <= pos
    mask = torch.zeros(b, 1, 1, cache.max_seq_len, dtype=x.dtype).masked_fill_(~keep, float("-inf"))
    return block(x, cos, sin, mask, cache, torch.tensor([pos]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("b", [1, 3, 8])
def test_layer_equals_the_two_fused_halves(dtype: torch.dtype, int8: bool, b: int, monkeypatch) -> None:
    """Same cache writes and router logits bit for bit (float32 from 7 rows: the halves' router runs
    on oneDNN, the sums in another order); the output as the halves' up to the last bit of the
    routing weights (expf against torch's exp)."""
    net, config = _decoder(dtype, int8)
    block = net.layers[1]
    caches = [_with_history(config, b, dtype) for _ in range(2)]
    x = torch.randn(b, 1, config.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    runs = []
    with torch.no_grad():
        runs.append(_step(block, config, x, caches[0], 9))
        assert block._layer_plan.ok
        monkeypatch.setattr(modules.CpuBlock, "_plan", lambda *a: None)
        runs.append(_step(block, config, x, caches[1], 9))
    (out, logits), (ref, ref_logits) = runs
    assert torch.equal(caches[0].k[1], caches[1].k[1]) and torch.equal(caches[0].v[1], caches[1].v[1])
    if dtype == torch.bfloat16 or b <= native.FLOAT32_MAX_ROWS:
        assert torch.equal(logits, ref_logits)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", [None, "int8", "int4"])
@pytest.mark.parametrize("b", [9, 16, LAYER_MAX_ROWS])
def test_a_decode_step_of_many_rows_is_each_row_alone(
    dtype: torch.dtype, mode: str | None, b: int, monkeypatch
) -> None:
    """A decode step of more rows than the separate kernels take (serving many requests) runs as one
    call; each row's output, logits and cache writes equal that row stepped alone, bit for bit (a
    request's tokens never depend on its neighbours), and the modules' step up to the order of sums
    (and, for int8, the kernel's rounding of activations to int16; int4 rows alone are tied to the
    modules by ``test_int4_layer_equals_the_module_path``)."""
    int8 = mode == "int8"
    net, config = _decoder(dtype, False, mode=mode)
    block = net.layers[1]
    x = torch.randn(b, 1, config.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)

    def cache() -> KVCache:  # the same earlier history every time
        return _with_history(config, b, dtype)

    with torch.no_grad():
        assert _fused(block, config, x, KVCache(config, b, 16, dtype=dtype)) is not None
        many = cache()
        out, logits = _step(block, config, x, many, 9)
        for r in range(b):
            one = KVCache(config, 1, 16, dtype=dtype)
            full = cache()
            one.k[1].copy_(full.k[1][r : r + 1])
            one.v[1].copy_(full.v[1][r : r + 1])
            o, lg = _step(block, config, x[r : r + 1], one, 9)
            assert torch.equal(o, out[r : r + 1]) and torch.equal(lg, logits[r : r + 1])
            assert torch.equal(one.k[1], many.k[1][r : r + 1]) and torch.equal(one.v[1], many.v[1][r : r + 1])
        if mode == "int4":
            return
        monkeypatch.setattr(modules.CpuBlock, "_plan", lambda *a: None)
        plain = cache()
        ref, ref_logits = _step(block, config, x, plain, 9)
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    pairs = ((many.k[1], plain.k[1]), (many.v[1], plain.v[1]), (logits, ref_logits), (out, ref))
    for got, want in pairs:
        atol = tol * (1 + 100 * int8) * want.float().abs().amax()
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["int4", "int4-mixed"])
@pytest.mark.parametrize("b", [1, 3])
def test_int4_layer_equals_the_module_path(dtype: torch.dtype, mode: str, b: int, monkeypatch) -> None:
    """int4 weights in the one call (int4-mixed: int8 attention) against the per-module int4 path
    (CpuInt4Linear, CpuInt4MoE) and against the int4 attention half: both round the activations to
    int8 per group the same way, so the caches and router logits agree to the dtype's rounding and
    the layer's own part of the output (out - x) to 1% of its largest value (another order of the
    float32 sums, bfloat16 rounding of the expert intermediates)."""
    net, config = _decoder(dtype, False, mode=mode)
    block = net.layers[1]
    assert type(block.feed_forward) is modules.CpuInt4MoE
    caches = [_with_history(config, b, dtype) for _ in range(3)]
    x = torch.randn(b, 1, config.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    runs = []
    with torch.no_grad():
        runs.append(_step(block, config, x, caches[0], 9))
        assert block._layer_plan.ok
        monkeypatch.setattr(modules.CpuBlock, "_plan", lambda *a: None)
        runs.append(_step(block, config, x, caches[1], 9))  # the attention half in one call
        monkeypatch.setattr(modules.CpuBlock, "_attention_half", lambda *a: None)
        runs.append(_step(block, config, x, caches[2], 9))  # every module on its own
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    (out, logits), *others = runs
    for (ref, ref_logits), cache in zip(others, caches[1:], strict=True):
        for got, want in ((caches[0].k[1], cache.k[1]), (caches[0].v[1], cache.v[1]), (logits, ref_logits)):
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        part, ref_part = (out - x).float(), (ref - x).float()
        torch.testing.assert_close(part, ref_part, rtol=0, atol=0.01 * ref_part.abs().max().item())


@pytest.mark.parametrize("mode", ["int4", "int4-mixed"])
def test_int4_model_decodes_in_one_call_per_layer(mode: str) -> None:
    net, config = _decoder(torch.bfloat16, False, mode=mode)
    calls = []
    real = LayerPlan.run
    x = torch.randn(1, 1, config.hidden_size).bfloat16()
    LayerPlan.run = lambda *a: calls.append(real(*a)) or calls[-1]
    try:
        with torch.no_grad():
            for block in net.layers:
                _step(block, config, x, KVCache(config, 1, 8, dtype=torch.bfloat16), 0)
    finally:
        LayerPlan.run = real
    assert len(calls) == config.num_hidden_layers and all(c is not None for c in calls)
    plan = net.layers[0]._layer_plan
    assert plan.struct.wtype_experts == 3 and plan.struct.G == 32
    assert plan.struct.wtype_attention == (2 if mode == "int4-mixed" else 3)


def test_plan_follows_weight_changes(monkeypatch) -> None:
    """Replacing a parameter, assigning ``.data``, editing in place and quantising all reach the
    next step (the plan is rebuilt where addresses change; in-place edits are read where they are)."""
    net, config = _decoder(torch.float32, False)
    block = net.layers[0]
    x = torch.randn(1, 1, config.hidden_size, generator=torch.Generator().manual_seed(3))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        cache = KVCache(config, 1, 8)
        with torch.no_grad():
            fused = _step(block, config, x, cache, 0)[0]
            with monkeypatch.context() as m:
                m.setattr(modules.CpuBlock, "_plan", lambda *a: None)
                plain = _step(block, config, x, KVCache(config, 1, 8), 0)[0]
        return fused, plain

    first, _ = both()
    keys = [block._layer_plan.key]  # plain values (ids, addresses): the test holds no weight
    att, ff = block.attention, block.feed_forward
    att.wq.weight = nn.Parameter(att.wq.weight * 2)
    ff.w2.data = ff.w2.data * 3
    with torch.no_grad():
        ff.gate.weight.mul_(-1)  # in place: the same addresses
    fused, plain = both()
    keys.append(block._layer_plan.key)
    assert keys[1] != keys[0] and block._layer_plan.ok
    assert not torch.allclose(fused, first)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    old = weakref.ref(ff.w1)
    quant.quantize_model(net, "int8")  # takes the kernels off, quantises, installs them again
    assert type(net.layers[0].feed_forward) is modules.CpuInt8MoE
    del att, ff  # the replaced modules
    gc.collect()
    assert old() is None  # the plan did not keep the float experts alive
    fused, plain = both()
    assert block._layer_plan.key not in keys and block._layer_plan.ok
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)


def test_plan_is_checked_by_identity_and_rebuilt_on_any_change(monkeypatch) -> None:
    """Later steps reuse the plan without gathering the weights again (``Watch``); a replaced child
    module, a submodule's class swapped, a buffer replaced, added or deleted, a setting changed each make
    the next step gather and key them again."""
    net, config = _decoder(torch.float32, True)
    block = net.layers[0]
    x = torch.randn(1, 1, config.hidden_size)
    gathered = []
    real = modules.CpuBlock._layer_weights
    monkeypatch.setattr(modules.CpuBlock, "_layer_weights", lambda self: gathered.append(1) or real(self))

    def step() -> int:
        gathered.clear()
        with torch.no_grad():
            _step(block, config, x, KVCache(config, 1, 8), 0)
        return len(gathered)

    assert step() == 1 and step() == 0 and step() == 0  # built once, then checked by identity
    att, ff = block.attention, block.feed_forward
    att.wk.__class__ = quant.Int8Linear  # the reference class: the layer does not fit, gathered every step
    assert step() == 1 and step() == 1
    att.wk.__class__ = modules.CpuInt8Linear  # back as the plan was built: it holds again
    assert step() == 0
    changes = [
        lambda: setattr(ff, "gate", modules.CpuLinear(config.hidden_size, ff.gate.weight.shape[0])),
        lambda: ff.register_buffer("w1_scale", ff.w1_scale.clone()),
        lambda: setattr(att.wo, "scale", att.wo.scale * 1),
        lambda: setattr(ff, "top_k", 1),
        lambda: setattr(block.ffn_norm, "eps", block.ffn_norm.eps * 2),
        lambda: ff.register_buffer("extra", torch.zeros(1)),  # one more tensor
        lambda: delattr(ff, "extra"),  # one fewer
    ]
    for n, change in enumerate(changes):
        change()
        assert step() == 1, n
        assert step() == 0, n


def test_layer_is_skipped_where_it_does_not_apply() -> None:
    net, config = _decoder(torch.float32, False)
    block = net.layers[0]
    runs = []
    real = LayerPlan.run
    x = torch.randn(1, 1, config.hidden_size)
    with torch.no_grad():
        LayerPlan.run = lambda *a: runs.append(1) or real(*a)
        try:
            _step(block, config, x, KVCache(config, 1, 8), 0)
            assert runs == [1]
            rows = LAYER_MAX_ROWS + 1  # a decode step of more rows than the kernel takes
            assert _fused(block, config, torch.randn(rows, 1, config.hidden_size), KVCache(config, rows, 8)) is None
            t = native.NATIVE_MAX_ROWS + 1  # a prompt chunk of more tokens than the products take
            assert _fused(block, config, torch.randn(1, t, config.hidden_size), KVCache(config, 1, 16)) is None
            assert _fused(block, config, x.bfloat16(), KVCache(config, 1, 8)) is None  # another dtype
            block.feed_forward.record_routing = True  # training statistics: the module path
            assert _fused(block, config, x, KVCache(config, 1, 8)) is None
            block.feed_forward.record_routing = False
            block.feed_forward.dispatch = "reference"
            assert _fused(block, config, x, KVCache(config, 1, 8)) is None
        finally:
            LayerPlan.run = real
    with torch.enable_grad():
        assert _fused(net.layers[1], config, x, KVCache(config, 1, 8)) is None  # autograd


def _fused(block: model.Block, config: MixtralConfig, x: torch.Tensor, cache: KVCache):
    """The layer's output when its forward ran as one kernel call, else None."""
    b, t = x.shape[:2]
    positions = torch.arange(t).expand(b, t)
    cos, sin = model.rotary_cos_sin(positions, model.inverse_frequencies(config.head_dim, config.rope_theta), x.dtype)
    mask = torch.zeros(b, 1, t, cache.max_seq_len, dtype=x.dtype)
    outs = []
    real = LayerPlan.run
    LayerPlan.run = lambda *a: outs.append(real(*a)) or outs[-1]
    try:
        block(x, cos, sin, mask, cache, torch.arange(t))
    except RuntimeError:  # the reference's own complaint (an input of another dtype): not one call
        pass
    finally:
        LayerPlan.run = real
    return next((o for o in outs if o is not None), None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
def test_decoding_mask_equals_build_mask(dtype: torch.dtype, window: int | None) -> None:
    """The kernel's additive mask is ``model.build_mask``'s, converted: left padding (invalid slots),
    a query's own slot, a sliding window, several new tokens."""
    g = torch.Generator().manual_seed(0)
    b, s = 3, 20
    k_valid = torch.rand(b, s, generator=g) < 0.8
    k_pos = torch.randint(0, 30, (b, s), generator=g)
    for slots in (torch.tensor([12]), torch.tensor([4, 5, 6])):
        positions = torch.randint(0, 30, (b, slots.shape[0]), generator=g)
        assert native.use_native_mask(slots, positions, k_pos, k_valid, dtype)
        got = native.native_mask(slots, positions, k_pos, k_valid, window, dtype)
        keep = model.build_mask(slots, positions, torch.arange(s), k_pos, k_valid, window)
        assert torch.equal(got, torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf")))
    assert not native.use_native_mask(slots.int(), positions, k_pos, k_valid, dtype)
    assert not native.use_native_mask(slots, positions, k_pos, k_valid, torch.float16)
