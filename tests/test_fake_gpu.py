"""The CUDA branches run on meta tensors with the exact Mixtral-8x7B shapes (no GPU, no memory).

Each test traces every aten op (``mixtral_lite.bench.trace``): a host sync raises ``HostSync``;
bytes per step are the trace's model of what the kernels move (see that module). Two of the 32
layers keep it fast: every layer runs the same code, and the bounds below scale with the layers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fake_cuda import fake_cuda, to_fake_devices
from torch.utils._python_dispatch import TorchDispatchMode

import mixtral_lite.generation.generate as generate_mod
import mixtral_lite.model.experts as experts_mod
from mixtral_lite.bench import active_weight_bytes
from mixtral_lite.bench.trace import (
    kv_bytes_attended,
    meta_model,
    sdpa_backend,
    trace_decode,
    trace_ops,
    trace_prefill,
)
from mixtral_lite.generation.generate import decode_step, prefill
from mixtral_lite.model.cache import KVCache
from mixtral_lite.model.experts import StackedExperts, choose_dispatch, experts_reference
from mixtral_lite.parallel.expert import LocalExperts
from mixtral_lite.weights.device_map import layer_devices

LAYERS = 2
PROMPT, CACHE = 32, 64
KINDS = [
    pytest.param(torch.bfloat16, False, id="bf16"),
    pytest.param(torch.float16, False, id="fp16"),
    pytest.param(torch.float32, False, id="fp32"),
    pytest.param(torch.bfloat16, True, id="int8"),
]


@pytest.fixture(scope="module")
def models() -> dict:
    return {}


def model_for(models: dict, dtype: torch.dtype, int8: bool):
    key = (dtype, int8)
    if key not in models:
        models[key] = meta_model(layers=LAYERS, dtype=dtype, int8=int8)
    return models[key]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize(("dtype", "int8"), KINDS)
def test_prefill_and_decode_never_sync(models, dtype: torch.dtype, int8: bool, batch: int) -> None:
    """fp16/fp32 prefill and batch 8 synced in the sorted loop's ``counts.tolist()``; int8 too."""
    model = model_for(models, dtype, int8)
    p = trace_prefill(model, batch, PROMPT, CACHE)
    d = trace_decode(model, batch, PROMPT, CACHE)
    assert p.syncs == [] and d.syncs == []
    assert d.kernels > 0


@pytest.mark.parametrize("batch", [1, 8])
def test_mixtral_8x22b_never_syncs(batch: int) -> None:
    model = meta_model("mixtral-8x22b", layers=LAYERS)
    assert trace_prefill(model, batch, PROMPT, CACHE).syncs == []
    assert trace_decode(model, batch, PROMPT, CACHE).syncs == []


@pytest.mark.parametrize("batch", [1, 8])
def test_generation_loop_reads_the_host_once_per_step(models, monkeypatch, batch: int) -> None:
    """The whole ``generate`` loop on meta: the only host read is ``_to_host`` (stood in for here,
    since meta tensors hold no tokens), once for prefill and once per decode step."""
    model = model_for(models, torch.bfloat16, False)
    reads = []

    def to_host(*tensors):
        reads.append(len(tensors))
        return [torch.ones(t.shape, dtype=t.dtype) for t in tensors], None

    monkeypatch.setattr(generate_mod, "_to_host", to_host)
    with trace_ops() as t:
        results = generate_mod.generate(model, _Tokenizer(), [[1, 5, 9]] * batch, max_new_tokens=4)
    assert t.syncs == []
    assert len(reads) == 4 and len(results) == batch


def test_decode_bytes_within_the_roofline_bound(models) -> None:
    """bf16 batch 1: at most 1.15x the active weights plus the keys and values attended."""
    model = model_for(models, torch.bfloat16, False)
    bound = 1.15 * (active_weight_bytes(model) + kv_bytes_attended(model, 1, CACHE))
    assert trace_decode(model, 1, PROMPT, CACHE).bytes <= bound


@pytest.mark.parametrize("batch", [1, 8])
def test_int8_decode_reads_at_most_0_6x_bf16s_bytes(models, batch: int) -> None:
    """With the GPU kernels installed (as loading onto CUDA does), int8 experts read only the
    chosen experts' int8 weights: at most 0.6x bf16's bytes per decode step, and at batch 1 at most
    1.15x the active int8 weights plus the keys and values attended. Before, the sync-free dispatch
    (``each``) read all 8 experts: 1.8x bf16's bytes at batch 1, 2.5x at batch 8."""
    model = model_for(models, torch.bfloat16, True)
    bf16 = trace_decode(model_for(models, torch.bfloat16, False), batch, PROMPT, CACHE).bytes
    int8 = trace_decode(model, batch, PROMPT, CACHE).bytes
    assert int8 <= 0.6 * bf16
    if batch == 1:
        assert int8 <= 1.15 * (active_weight_bytes(model) + kv_bytes_attended(model, 1, CACHE))


def test_int8_reference_modules_read_int8_weights_once(models) -> None:
    """Without the GPU kernels (the reference ``Int8MoE`` off the CPU): every matrix through
    ``_weight_int8pack_mm`` (1 byte per weight, once) and every expert once (the sync-free
    dispatch cannot pick the chosen 2 without a copy): at most the bytes of all int8 weights plus
    the cache. Before, the bf16 rule grouped over float copies of every expert: about 4x bf16's."""
    model = meta_model(layers=LAYERS, int8=True, kernels=False)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    emb = model.tok_embeddings.weight
    bound = 1.15 * (weights - emb.numel() * emb.element_size() + kv_bytes_attended(model, 1, CACHE))
    bf16 = trace_decode(model_for(models, torch.bfloat16, False), 1, PROMPT, CACHE).bytes
    int8 = trace_decode(model, 1, PROMPT, CACHE).bytes
    assert int8 <= bound and int8 <= 2 * bf16


def test_int8_products_write_no_float_copy_of_a_weight(models) -> None:
    """No op of an int8 decode step writes as many bytes as a float copy of one weight matrix
    (the attention output projection, the smallest the products read)."""
    model = model_for(models, torch.bfloat16, True)
    smallest = model.layers[0].attention.wo.weight.numel() * 2
    largest = max(op.written for op in trace_decode(model, 1, PROMPT, CACHE).ops)
    assert largest < smallest


def test_decode_attention_takes_a_fused_backend(models) -> None:
    """Prefill into a cache and decoding attend with a mask; grouped heads with a mask fell back
    to the math backend."""
    model = model_for(models, torch.bfloat16, False)
    assert set(trace_decode(model, 1, PROMPT, CACHE).sdpa_backends) == {"efficient"}
    assert set(trace_prefill(model, 1, PROMPT, CACHE).sdpa_backends) == {"efficient"}


@pytest.mark.parametrize("t", [1, 5])
def test_folded_attention_matches_enable_gqa_on_cpu(t: int) -> None:
    """The folded layout against the grouped-heads call it replaces, float32."""
    from mixtral_lite import Mixtral, MixtralConfig

    config = MixtralConfig.from_preset("tiny")
    att = Mixtral(config).layers[0].attention
    g = torch.Generator().manual_seed(0)
    b, s, hd = 3, 11, att.head_dim
    q = torch.randn(b, att.n_heads, t, hd, generator=g)
    k, v = (torch.randn(b, att.n_kv_heads, s, hd, generator=g) for _ in range(2))
    mask = torch.zeros(b, 1, t, s).masked_fill_(torch.rand(b, 1, t, s, generator=g) < 0.3, float("-inf"))
    mask[..., 0] = 0.0
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(att.attend(q, k, v, mask, is_causal=False), want, rtol=1e-6, atol=1e-6)
    assert sdpa_backend(q.to(torch.bfloat16), k, mask, True) == "math"


def test_grouped_mm_only_where_the_gpu_has_its_kernel(models, monkeypatch) -> None:
    """Below sm90 ``_grouped_mm`` loops on the host: bf16 gathers (few rows) or runs dense."""
    model = model_for(models, torch.bfloat16, False)
    moe = model.layers[0].feed_forward
    x = torch.zeros(8, model.config.hidden_size, dtype=torch.bfloat16, device="meta")
    few, many = (torch.zeros(n, 2, dtype=torch.long, device="meta") for n in (1, 8))
    assert choose_dispatch(x[:1], moe, few) == "sorted"
    monkeypatch.setattr(experts_mod, "META_CAPABILITY", (8, 0))
    assert choose_dispatch(x[:1], moe, few) == "gather"
    assert choose_dispatch(x, moe, many) == "dense"
    assert trace_decode(model, 8, PROMPT, CACHE).syncs == []


def test_expert_parallel_rank_step_never_syncs() -> None:
    """A rank's experts on meta (``nonzero`` picked the owned pairs: a sync every layer)."""
    d, i, n = 4096, 14336, 8
    stacks = [torch.empty(4, *shape, dtype=torch.bfloat16, device="meta") for shape in ((i, d), (d, i), (i, d))]
    x = torch.empty(n, d, dtype=torch.bfloat16, device="meta")
    idx = torch.zeros(n, 2, dtype=torch.long, device="meta")
    w = torch.empty(n, 2, device="meta")
    with trace_ops() as t:
        LocalExperts(first=4)(x, StackedExperts(*stacks), idx, w)
    assert t.syncs == []


def test_expert_parallel_ranks_sum_to_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    e, d, i, n = 8, 16, 24, 10
    w1, w2, w3 = (torch.randn(e, *s, generator=g) for s in ((i, d), (d, i), (i, d)))
    x = torch.randn(n, d, generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(n)])
    w = torch.rand(n, 2, generator=g)
    want = experts_reference(x, StackedExperts(w1, w2, w3), idx, w)
    got = sum(
        LocalExperts(first=r * 4)(
            x, StackedExperts(w1[r * 4 : r * 4 + 4], w2[r * 4 : r * 4 + 4], w3[r * 4 : r * 4 + 4]), idx, w
        )
        for r in range(2)
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_host_copy_event_is_recorded_on_the_tensors_device(monkeypatch) -> None:
    """With ``device_map`` the sampled tokens live on the last GPU: the event must be recorded on
    that device's stream, not the current device's (cuda:0)."""
    recorded = []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

    class Stream:
        def __init__(self, device):
            self.device = device

    class FakeCuda:
        def __init__(self, shape):
            self.shape, self.dtype, self.device = shape, torch.long, torch.device("cuda", 1)

    class Host:
        def copy_(self, t, non_blocking=False):
            return self

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: _Null())
    monkeypatch.setattr(generate_mod.torch, "empty", lambda *a, **k: Host())
    generate_mod._to_host(FakeCuda((8,)))
    assert len(recorded) == 1 and recorded[0] is not None and recorded[0].device == torch.device("cuda", 1)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Tokenizer:
    """What the generation loop asks of a tokenizer: nothing here decodes real text."""

    vocab_size, eos_id = 32000, 2

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


@pytest.mark.parametrize(("tp", "ep"), [(2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_parallel_rank_step_never_syncs(tp: int, ep: int, int8: bool) -> None:
    """One rank's share of 8x7B (its heads, its intermediate slice, its experts) on meta: prefill
    and decode; the all-reduce hooks stand in for the collectives (kernels, not host reads)."""
    from mixtral_lite.model.quant import quantize_model
    from mixtral_lite.parallel.dist import ParallelState
    from mixtral_lite.parallel.shard import shard_model

    model = shard_model(meta_model(layers=LAYERS), ParallelState(tp=tp, ep=ep, rank=tp * ep - 1))
    reduced = []
    for block in model.layers:
        for module in (block.attention, block.feed_forward):
            if module.reduce is not None:
                module.reduce = lambda y: reduced.append(y.shape) or y
    if int8:
        quantize_model(model)  # keeps the hooks: the dispatch and reduce move to the int8 layer
    assert model.layers[0].attention.n_kv_heads == 8 // tp
    assert trace_prefill(model, 8, PROMPT, CACHE).syncs == []
    assert trace_decode(model, 1, PROMPT, CACHE).syncs == []
    assert len(reduced) == 2 * LAYERS * (1 + (tp > 1))


TWO_GPUS = [torch.device("cuda", 0), torch.device("cuda", 1)]


class _Transfers(TorchDispatchMode):
    """Every copy between two devices: (shape, from, to)."""

    def __init__(self) -> None:
        super().__init__()
        self.moves: list[tuple[tuple[int, ...], str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and out.device != args[0].device:
            self.moves.append((tuple(out.shape), str(args[0].device), str(out.device)))
        return out


def _split_model(int8: bool):
    """Mixtral-8x7B's shapes, two layers, to go on two fake GPUs (``to_fake_devices``): layer 0 (and
    the embedding) on cuda:0, layer 1 (and the norm and head) on cuda:1, as
    ``load_model(device_map=...)`` places them."""
    return meta_model(layers=LAYERS, int8=int8)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_device_map_over_two_gpus_moves_the_hidden_state_once(monkeypatch, int8: bool, batch: int) -> None:
    """Prefill and a decode step with the layers split over cuda:0 and cuda:1 (FakeTensors: an op
    mixing the two raises): no host sync, and at the split the hidden state [B, T, D] and the
    per-step inputs that layer 1 reads (rotary cos and sin, the mask, the cache slots) move to
    cuda:1, once each; the logits come out on cuda:1."""
    monkeypatch.setattr(experts_mod, "_capability", lambda index: (9, 0))  # an H100/H200
    model = _split_model(int8)
    with fake_cuda(monkeypatch) as (mode, _), torch.no_grad():
        to_fake_devices(model, mode, TWO_GPUS)
        d = model.config.hidden_size
        cache = KVCache(model.config, batch, CACHE, device=layer_devices(model), dtype=model.dtype)
        ids = torch.zeros(batch, PROMPT, dtype=torch.long, device=TWO_GPUS[0])
        with trace_ops() as p, _Transfers() as moved_p:
            logits = prefill(model, ids, cache, None)
        assert logits.device == TWO_GPUS[1] and p.syncs == []
        slot = torch.tensor([PROMPT], device=TWO_GPUS[0])
        positions = torch.full((batch, 1), PROMPT, device=TWO_GPUS[0])
        tokens = logits.argmax(-1)[:, None].to(TWO_GPUS[0])
        with trace_ops() as s, _Transfers() as moved_s:
            logits = decode_step(model, tokens, cache, slot, positions)
        assert logits.device == TWO_GPUS[1] and s.syncs == []
    for moved, t in ((moved_p.moves, PROMPT), (moved_s.moves, 1)):
        assert all(src == "cuda:0" and dst == "cuda:1" for _, src, dst in moved), moved
        assert len(moved) == 5, moved  # h, cos, sin, mask, slots
        assert sum(shape == (batch, t, d) for shape, _, _ in moved) == 1


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_generation_over_two_gpus_reads_the_host_on_the_last_gpus_stream(monkeypatch, int8: bool) -> None:
    """The real ``generate`` loop (``_to_host`` included) on the split model: no host sync, and each
    step's tokens, sampled on cuda:1, are copied to pinned host memory on cuda:1's stream with the
    event recorded on that same stream and waited on before the host reads them. Before, the
    event went on the current device's stream (cuda:0): the host could read before the copy."""
    monkeypatch.setattr(experts_mod, "_capability", lambda index: (9, 0))
    model = _split_model(int8)
    with fake_cuda(monkeypatch) as (mode, runtime):
        to_fake_devices(model, mode, TWO_GPUS)
        with trace_ops() as t:
            results = generate_mod.generate(model, _Tokenizer(), [[1, 5, 9], [7, 3]], max_new_tokens=4)
    assert t.syncs == [] and len(results) == 2
    assert [len(r.token_ids) for r in results] == [4, 4]  # the fake host buffers hold token 1: never EOS
    last = runtime.current[TWO_GPUS[1]]
    assert runtime.host_copies == [(TWO_GPUS[1], last)] * 8  # tokens and logprobs, 4 steps
    assert len(runtime.events) == 4
    assert all(e.stream is last and e.waited for e in runtime.events), runtime.events
    assert runtime.synchronized == [TWO_GPUS[1]]
