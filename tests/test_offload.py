"""Experts apart from the model (``mixtral_lite.offload``): the planner on made-up sizes, the LRU,
every placement against the all-resident model, int8 checkpoints, and the CLI's flags and errors.

Equality is exact (``torch.equal``) where both sides run the reference products, and within the
CPU kernels' float32 summation order (1e-5) where the kernels are installed.
"""

from __future__ import annotations

import json

import pytest
import torch
from gen_fixtures import one_thread  # noqa: F401 (autouse fixture)
from helpers import make_hf_model, save_mistral_layout

from mixtral_lite import MixtralConfig, UserError, count_parameters, generate, load_model, save_pretrained
from mixtral_lite.cli import main
from mixtral_lite.commands.generate import BUNDLED
from mixtral_lite.model.experts import StackedExperts, dispatch_experts, experts_reference
from mixtral_lite.model.quant import Int8MoE, quantize_model
from mixtral_lite.offload import ExpertLRU, Placement, offload_experts, plan_placement
from mixtral_lite.offload.cache import replay, reuse_rate
from mixtral_lite.offload.install import cpu_product
from mixtral_lite.offload.moe import OffloadedInt8MoE, OffloadedMoE
from mixtral_lite.offload.placement import model_bytes
from mixtral_lite.offload.stores import CachedExperts, HostExperts, expert_product, run_experts

GB = 10**9
IDS = torch.tensor([[1, 5, 9, 33, 7, 2, 64, 11, 90, 3]])


# ---- the planner: a pure function of sizes ------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral():
    return MixtralConfig.from_preset("mixtral-8x7b")


@pytest.fixture(scope="module")
def int8_bytes(mixtral):
    return model_bytes(mixtral, torch.bfloat16, "int8")


def test_model_bytes_are_the_8x7b_arithmetic(mixtral, int8_bytes) -> None:
    """bf16: 2 bytes per parameter, experts 8 x 176,160,768 per layer (REFERENCE.md); int8: one
    byte per expert weight plus a bf16 scale per row (w1, w3: 14336 rows, w2: 4096)."""
    bf16 = model_bytes(mixtral, torch.bfloat16)
    assert bf16.experts == (8 * 176_160_768 * 2,) * 32
    assert bf16.rest + sum(bf16.experts) == 46_702_792_704 * 2
    assert int8_bytes.experts == (8 * (176_160_768 + 2 * (2 * 14336 + 4096)),) * 32
    assert int8_bytes.per_expert == 176_160_768 + 2 * (2 * 14336 + 4096)


def test_everything_on_the_device_when_it_fits(mixtral) -> None:
    p = plan_placement(mixtral, torch.bfloat16, {"cuda:0": 140 * GB, "cpu": 24 * GB}, quantize="int8")
    assert p.resident and p.experts == ("device",) * 32


def test_auto_offloads_the_fewest_first_layers_to_the_host(mixtral, int8_bytes) -> None:
    """A 24 GB GPU and 64 GB of host memory: the first n layers' experts go to the CPU, n the
    smallest that leaves the rest in 90% of the GPU (and the cache of each offloaded layer there)."""
    free = {"cuda:0": 24 * GB, "cpu": 64 * GB}
    p = plan_placement(mixtral, torch.bfloat16, free, quantize="int8", cache=1)
    n = len(p.offloaded)
    assert p.experts == ("cpu",) * n + ("device",) * (32 - n)
    per_layer, one = int8_bytes.experts[0], int8_bytes.per_expert

    def on_gpu(k: int) -> int:
        return int8_bytes.rest + (32 - k) * per_layer + k * one

    assert on_gpu(n) <= 0.9 * free["cuda:0"] < on_gpu(n - 1)
    assert dict(p.needed)["cpu"] == n * per_layer


def test_auto_goes_to_disk_when_the_host_is_too_small(mixtral) -> None:
    p = plan_placement(mixtral, torch.bfloat16, {"cuda:0": 24 * GB, "cpu": 8 * GB}, quantize="int8", cache=0)
    assert set(p.experts) == {"disk", "device"} and p.experts[0] == "disk"


def test_cpu_only_machine_puts_the_first_layers_on_disk(mixtral) -> None:
    """24 GB of RAM cannot hold 8x7B in int8 (47 GB): the first layers' experts stay on disk."""
    p = plan_placement(mixtral, torch.bfloat16, {"cpu": 24 * GB}, quantize="int8", cache=0)
    n = len(p.offloaded)
    assert 0 < n < 32 and p.experts[:n] == ("disk",) * n


def test_explicit_placement_and_its_cache(mixtral, int8_bytes) -> None:
    p = plan_placement(mixtral, torch.bfloat16, {"cpu": 24 * GB}, quantize="int8", experts_on="disk", n_cpu_moe=28)
    assert p.experts == ("disk",) * 28 + ("device",) * 4
    left = 0.9 * 24 * GB - int8_bytes.rest - 4 * int8_bytes.experts[0]
    assert p.cache == min(4, int(left // (28 * int8_bytes.per_expert)))
    assert "layers 0-27 on disk" in str(p) and "layers 28-31 on cpu" in str(p)


def test_does_not_fit_even_so_names_the_bytes(mixtral) -> None:
    with pytest.raises(UserError) as err:
        plan_placement(mixtral, torch.bfloat16, {"cpu": 1.5 * GB}, quantize="int8", experts_on="disk")
    message = str(err.value)
    assert "does not fit" in message and "cpu needs" in message and "has 1.35 GB (1,350,000,000 bytes)" in message
    with pytest.raises(UserError, match=r"cpu needs .* has"):
        plan_placement(mixtral, torch.bfloat16, {"cuda:0": 10 * GB, "cpu": 20 * GB}, quantize="int8", experts_on="cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_cpu_moe": 33}, "n_cpu_moe: expected a number of layers in 0..32, got 33"),
        ({"n_cpu_moe": -1}, "n_cpu_moe: expected a number of layers in 0..32, got -1"),
        ({"experts_on": "gpu"}, "experts_on: expected one of auto, cpu, disk, got 'gpu'"),
        ({"experts_on": "cpu"}, "experts_on: 'cpu' keeps the experts in host memory beside a GPU"),
        ({"experts_on": "disk", "cache": 9}, "expert_cache: expected 0..8 experts per layer, got 9"),
    ],
)
def test_bad_placements_are_named(mixtral, kwargs, message) -> None:
    with pytest.raises(UserError) as err:
        plan_placement(mixtral, torch.bfloat16, {"cpu": 100 * GB}, quantize="int8", **kwargs)
    assert str(err.value).startswith(message)


# ---- the LRU --------------------------------------------------------------------------------------


def test_lru_evicts_the_least_recently_used() -> None:
    lru, loads = ExpertLRU(2), []
    for e in (0, 1, 0, 2, 1, 0):
        lru.get(e, lambda e: loads.append(e) or e)
    assert loads == [0, 1, 2, 1, 0] and lru.keys() == [1, 0]
    assert (lru.stats.hits, lru.stats.misses) == (1, 5)
    none = ExpertLRU(0)
    none.get(3, lambda e: e)
    assert len(none) == 0 and none.stats.misses == 1


def test_replay_and_reuse_rate() -> None:
    steps = [[0, 1], [1, 2], [1, 2], [3, 4]]
    assert reuse_rate(steps) == pytest.approx(3 / 6)
    stats = replay(steps, 2)
    assert (stats.hits, stats.misses) == (3, 5)
    assert replay(steps, 8).misses == 5  # every expert once


# ---- stores and products --------------------------------------------------------------------------


def _stacks(e=4, d=32, i=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(e, *s, generator=g) * 0.1 for s in ((i, d), (d, i), (i, d)))


def test_cpu_product_is_the_reference_product() -> None:
    ws = tuple(w[1] for w in _stacks())
    x = torch.randn(3, 32)
    torch.testing.assert_close(cpu_product(x, ws, None), expert_product(x, ws, None), rtol=1e-5, atol=1e-5)
    from mixtral_lite.model.quant import quantize_per_channel

    qs = [quantize_per_channel(w, torch.bfloat16) for w in ws]
    q, s = tuple(a for a, _ in qs), tuple(b for _, b in qs)
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(cpu_product(xb, q, s), expert_product(xb, q, s), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("capacity", [0, 1, 2, 4])
def test_cached_host_experts_equal_the_reference_loop(capacity: int) -> None:
    ws = _stacks()
    host = HostExperts(ws, None)
    from mixtral_lite.offload.cache import OffloadStats

    stats = OffloadStats()
    cached = CachedExperts(host, torch.device("cpu"), capacity, stats, expert_product)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 32, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)])
    w = torch.rand(9, 2, generator=g)
    resident = StackedExperts(*ws)
    want = experts_reference(x, resident, idx, w)
    for _ in range(2):  # the same dispatch as the resident stacks: exact; and the reference loop
        assert torch.equal(run_experts(x, cached, idx, w), dispatch_experts(x, resident, idx, w))
        assert torch.equal(
            run_experts(x[:1], cached, idx[:1], w[:1]), dispatch_experts(x[:1], resident, idx[:1], w[:1])
        )
        torch.testing.assert_close(run_experts(x, cached, idx, w), want, rtol=1e-6, atol=1e-6)
    if capacity == 4:
        assert stats.misses == 4  # each expert loaded once, then hits


# ---- every placement against the all-resident model ---------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A transformers checkpoint (hub keys, one per expert)."""
    path = tmp_path_factory.mktemp("hub")
    make_hf_model(0, num_hidden_layers=3).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory, hub):
    """The same model quantised and saved: int8 buffers and scales under our names."""
    path = tmp_path_factory.mktemp("int8")
    save_pretrained(quantize_model(load_model(hub, cpu_kernels=False)), path)
    return path


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def test_int8_checkpoint_round_trip_is_exact(hub, int8_folder) -> None:
    config = json.loads((int8_folder / "config.json").read_text())
    assert config["model_type"] == "mixtral_lite"
    assert config["quantization_config"]["mode"] == "int8" and config["quantization_config"]["include_output"]
    want = _logits(quantize_model(load_model(hub, cpu_kernels=False)))
    got = load_model(int8_folder, cpu_kernels=False)
    assert got.quantized == "int8" and isinstance(got.layers[0].feed_forward, Int8MoE)
    assert torch.equal(_logits(got), want)
    with pytest.raises(UserError, match="is already quantised \\(int8\\)"):
        load_model(int8_folder, quantize="int8")


@pytest.mark.parametrize("cache", [0, 1, 3])
@pytest.mark.parametrize("kind", ["float", "int8 file", "int8 after load"])
def test_disk_experts_equal_the_resident_model(hub, int8_folder, kind: str, cache: int) -> None:
    """Reference products on both sides: bit for bit, prefill (10 tokens) and one token."""
    folder = int8_folder if kind == "int8 file" else hub
    quantize = "int8" if kind == "int8 after load" else None
    resident = load_model(folder, quantize=quantize, cpu_kernels=False)
    disk = load_model(folder, quantize=quantize, cpu_kernels=False, experts_on="disk", expert_cache=cache)
    moe = disk.layers[0].feed_forward
    assert type(moe) is (OffloadedMoE if kind == "float" else OffloadedInt8MoE)
    assert "w1" not in dict(moe.named_buffers()) | dict(moe.named_parameters())
    for ids in (IDS, IDS[:, :1]):
        with torch.no_grad():
            assert torch.equal(disk(ids), resident(ids))
    stats = disk.offload.stats
    assert stats.bytes_read > 0 and stats.misses > 0
    assert (stats.hits > 0) == (cache > 0)


def test_first_layers_only_and_generation_with_the_cpu_kernels(hub) -> None:
    """``n_cpu_moe=2``: layers 0-1 on disk, layer 2 resident; with the CPU kernels installed the
    greedy tokens are the resident model's and the logits agree to float32 summation order."""
    resident = load_model(hub)
    disk = load_model(hub, experts_on="disk", n_cpu_moe=2, expert_cache=2)
    assert disk.offload.placement.experts == ("disk", "disk", "device")
    assert type(disk.layers[2].feed_forward).__name__ == "CpuSparseMoE"
    torch.testing.assert_close(_logits(disk), _logits(resident), rtol=1e-5, atol=1e-5)
    tok = _Tokenizer()
    want = generate(resident, tok, IDS[0].tolist(), max_new_tokens=8)
    got = generate(disk, tok, IDS[0].tolist(), max_new_tokens=8)
    assert got.token_ids == want.token_ids
    d = got.stats.as_dict()["experts"]
    assert d["decode"]["bytes_read_per_token"] > 0 and 0 <= d["decode"]["hit_rate"] <= 1
    assert "decode experts: expert cache hit rate" in got.stats.summary()


def test_auto_keeps_a_model_that_fits_resident(hub) -> None:
    model = load_model(hub, experts_on="auto")
    assert getattr(model, "offload", None) is None
    assert type(model.layers[0].feed_forward).__name__ == "CpuSparseMoE"


def test_host_experts_equal_the_resident_model(hub) -> None:
    """Experts in host memory (on a CPU-only machine the planner refuses it: placed by hand)."""
    resident = load_model(hub, cpu_kernels=False)
    model = load_model(hub, cpu_kernels=False)
    offload_experts(model, Placement("cpu", ("cpu", "device", "cpu")), cpu_kernels=False)
    assert isinstance(model.layers[0].feed_forward.store, HostExperts)
    for ids in (IDS, IDS[:, :1]):
        with torch.no_grad():
            assert torch.equal(model(ids), resident(ids))


def test_offloaded_models_refuse_what_would_lose_experts(hub, tmp_path) -> None:
    model = load_model(hub, experts_on="disk", n_cpu_moe=2)
    assert count_parameters(model) == count_parameters(model.config)  # the experts on disk count
    with pytest.raises(UserError, match="experts are offloaded"):
        quantize_model(model)
    with pytest.raises(UserError, match="experts are offloaded"):
        save_pretrained(model, tmp_path / "out")


def test_disk_needs_a_memory_mappable_checkpoint(tmp_path) -> None:
    folder = save_mistral_layout(make_hf_model(0), tmp_path / "pth", fmt="pth")
    with pytest.raises(UserError) as err:
        load_model(folder, experts_on="disk")
    assert str(err.value).startswith(f"experts_on='disk': {folder / 'consolidated.00.pth'} is a pth file")


# ---- the command line ---------------------------------------------------------------------------


def test_cli_generate_with_experts_on_disk(capsys) -> None:
    """The bundled model: the same greedy text, and the experts' counters in --json."""
    args = ["generate", "--prompt", "ROMEO:", "--max-new-tokens", "6", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*args, "--experts-on", "disk", "--expert-cache", "2"]) == 0
    disk = json.loads(capsys.readouterr().out)
    assert disk["token_ids"] == plain["token_ids"]
    experts = disk["stats"]["experts"]
    assert experts["decode"]["bytes_read_per_token"] > 0 and experts["prefill"]["misses"] > 0
    assert "experts" not in plain["stats"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--experts-on", "disk", "--n-cpu-moe", "5"], "--n-cpu-moe: expected a number of layers in 0..4, got 5"),
        (["--experts-on", "cpu"], "--experts-on: 'cpu' keeps the experts in host memory beside a GPU"),
        (["--experts-on", "disk", "--expert-cache", "9"], "--expert-cache: expected 0..8 experts per layer, got 9"),
        (["--experts-on", "disk", "--compile"], "--compile: not available with --experts-on"),
    ],
)
def test_cli_bad_placements_one_line_exit_2(flags, message, capsys) -> None:
    assert (BUNDLED / "config.json").is_file()
    assert main(["generate", "--prompt", "Hi", "--device", "cpu", *flags]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"mixtral-lite generate: error: {message}") and err.count("\n") == 1


class _Tokenizer:
    vocab_size, eos_id = 128, 2

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


# ---- a GPU beside host-memory experts, without a GPU ---------------------------------------------


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Run a meta-device model whose experts live in (real) host memory: a copy from meta to the
    CPU is a host read; it is counted and given zeros of its shape (meta tensors hold no data)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and args[0].is_meta and kwargs.get("device") == torch.device("cpu"):
            self.reads.append(tuple(args[0].shape))
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            if any(isinstance(a, torch.Tensor) and a.is_meta for a in args):
                raise AssertionError(f"host sync on the device: {func}")
        return func(*args, **kwargs)


def test_experts_in_host_memory_beside_a_device_read_only_the_routing() -> None:
    """The model on the meta device (a stand-in for a GPU), layers 0 and 2 with their experts in
    host memory: each of those layers sends its hidden states, expert ids and weights to the
    host (3 copies) and nothing else waits for the host; the resident layer never does."""
    from mixtral_lite.bench.trace import meta_model

    model = meta_model("tiny", layers=3, dtype=torch.float32)
    c = model.config
    e, d, i = c.num_experts, c.hidden_size, c.intermediate_size
    g = torch.Generator().manual_seed(0)
    for layer in (0, 2):
        moe = model.layers[layer].feed_forward
        for name, shape in (("w1", (e, i, d)), ("w2", (e, d, i)), ("w3", (e, i, d))):
            setattr(moe, name, torch.nn.Parameter(torch.randn(*shape, generator=g), requires_grad=False))
    offload_experts(model, Placement("meta", ("cpu", "device", "cpu"), cache=2), copy_min_tokens=1 << 30)
    ids = torch.zeros(1, 5, dtype=torch.long, device="meta")
    with torch.no_grad(), _HostReads() as mode:
        model(ids)
    assert mode.reads == [(5, d), (5, c.num_experts_per_tok), (5, c.num_experts_per_tok)] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("copy_min_tokens", [1 << 30, 1], ids=["cpu computes", "prefill copies"])
def test_cuda_experts_in_host_memory_equal_the_resident_model(hub, copy_min_tokens: int) -> None:
    """On a GPU: experts in pinned host memory computed by the CPU (or copied through the GPU's
    LRU) against the model all on the GPU, float32 (the CPU's and the GPU's products round apart)."""
    resident = load_model(hub, device="cuda", dtype="float32")
    model = load_model(hub, device="cuda", dtype="float32")
    offload_experts(model, Placement("cuda:0", ("cpu", "device", "cpu"), cache=2), copy_min_tokens=copy_min_tokens)
    assert model.layers[0].feed_forward.store.ws[0].is_pinned()
    for ids in (IDS.cuda(), IDS[:, :1].cuda()):
        with torch.no_grad():
            torch.testing.assert_close(model(ids), resident(ids), rtol=1e-4, atol=1e-4)
    assert (model.offload.stats.bytes_copied > 0) == (copy_min_tokens == 1)
