"""Tensor and expert parallelism equal the single-process model.

In-process: each rank's partial outputs sum to the full layer (float32, <= 1e-5), per-rank loading
reads exactly the slices ``shard_model`` cuts (bit-equal), and bad sizes fail with clear errors.
Across processes (torchrun, gloo, 2 ranks): ``--tp 2`` and ``--ep 2`` logits, prefill and
KV-cache decode, equal the single-process model (float32, <= 1e-4), and launch errors make every
rank exit non-zero within seconds.

Run as a script under torchrun this file is the worker of the multi-process tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixtral_lite import KVCache, Mixtral, MixtralConfig
from mixtral_lite.model.experts import StackedExperts, dispatch_experts, experts_reference
from mixtral_lite.model.routing import route_topk
from mixtral_lite.parallel import (
    LocalExperts,
    ParallelError,
    ParallelState,
    check_parallel,
    check_world,
    load_parallel,
    local_kv_heads,
    shard_model,
)
from mixtral_lite.parallel.expert import expert_range
from mixtral_lite.weights.checkpoint import half_to_interleaved
from mixtral_lite.weights.loading import load_model

PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
MODES = {"tp2": (2, 1), "ep2": (1, 2), "tp2ep2": (2, 2)}  # name -> (tp, ep)
# kv=2 splits the kv heads; kv=1 replicates the one kv head on both tensor-parallel ranks.
CHECKPOINTS = {"kv2": dict(num_key_value_heads=2), "kv1": dict(num_key_value_heads=1, num_local_experts=8)}


def _forward_both_ways(model: Mixtral, kv_heads: int) -> dict[str, torch.Tensor]:
    """Logits [2, 12, V] for a whole prompt, and for 8 prefilled + 4 decoded tokens through a cache."""
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 16, num_kv_heads=kv_heads)
        steps = [model(ids[:, :8], cache=cache, slots=torch.arange(8))]
        for t in range(8, 12):
            steps.append(model(ids[:, t : t + 1], cache=cache, slots=torch.tensor([t])))
    return {"full": full, "cached": torch.cat(steps, dim=1)}


def _load_single(path: Path) -> Mixtral:
    return load_model(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from helpers import make_hf_model

    out = {}
    for name, overrides in CHECKPOINTS.items():
        path = tmp_path_factory.mktemp(name)
        make_hf_model(seed=3, **overrides).save_pretrained(path)
        out[name] = path
    return out


# ---- in process: the split is exact -----------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "sorted", "per_token", "gather"])
def test_local_experts_sum_to_reference(impl):
    """Two ranks' LocalExperts outputs (experts 0-3 and 4-7) sum to the reference over all 8 (<= 1e-5)."""
    g = torch.Generator().manual_seed(0)
    e, d, i, n = 8, 16, 24, 11
    w1, w2, w3 = (torch.randn(*s, generator=g) * 0.3 for s in ((e, i, d), (e, d, i), (e, i, d)))
    x = torch.randn(n, d, generator=g)
    idx, weights = route_topk(torch.randn(n, e, generator=g), 2)
    expected = experts_reference(x, StackedExperts(w1, w2, w3), idx, weights)
    got = sum(
        dispatch_experts(x, StackedExperts(w1[lo:hi], w2[lo:hi], w3[lo:hi]), idx, weights, LocalExperts(lo, impl))
        for lo, hi in ((0, 4), (4, 8))
    )
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(("tp", "ep", "kv"), [(2, 1, 2), (4, 1, 2), (4, 1, 1), (1, 2, 2), (1, 4, 2), (2, 2, 2)])
def test_rank_partials_sum_to_full_layer(tp, ep, kv):
    """Sum over ranks of each rank's attention and MoE output (reduce hooks off) = the full layer (<= 1e-5)."""
    config = MixtralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=kv, moe={"num_experts": 4, "num_experts_per_tok": 2},
    )  # fmt: skip
    torch.manual_seed(0)
    full = Mixtral(config).eval()
    full.reset_parameters(std=0.3)
    x = torch.randn(2, 5, 32)
    pos = torch.arange(5).expand(2, 5)
    from mixtral_lite.model.mixtral import inverse_frequencies, rotary_cos_sin

    cos, sin = rotary_cos_sin(pos, inverse_frequencies(config.head_dim, config.rope_theta), x.dtype)
    with torch.no_grad():
        want_attn = full.layers[0].attention(x, cos, sin, None)
        want_moe = full.layers[0].feed_forward(x)[0]
        got_attn, got_moe = torch.zeros_like(x), torch.zeros_like(x)
        for rank in range(tp * ep):
            shard = shard_model(_copy(full), ParallelState(tp=tp, ep=ep, rank=rank))
            layer = shard.layers[0]
            layer.attention.reduce = layer.feed_forward.reduce = None  # sum here instead of all-reduce
            got_moe += layer.feed_forward(x)[0]  # each rank: its experts x its slice of I
            if rank < tp:  # attention is replicated across expert-parallel groups: count one group
                got_attn += layer.attention(x, cos, sin, None)
            assert local_kv_heads(shard) == max(kv // tp, 1)
    assert (got_attn - want_attn).abs().max().item() <= 1e-5
    assert (got_moe - want_moe).abs().max().item() <= 1e-5


def _copy(model: Mixtral) -> Mixtral:
    clone = Mixtral(model.config).eval().requires_grad_(False)
    clone.load_state_dict(model.state_dict())
    return clone


@pytest.mark.parametrize("mode", ["tp2", "ep2", "tp2ep2"])
def test_slice_loading_reads_what_shard_model_cuts(checkpoints, mode):
    """Every rank's parameters read from the files are bit-equal to the slices of the full model."""
    tp, ep = {"tp2": (2, 1), "ep2": (1, 2), "tp2ep2": (2, 2)}[mode]
    path = checkpoints["kv2"]
    full = _load_single(path)
    for rank in range(tp * ep):
        state = ParallelState(tp=tp, ep=ep, rank=rank)
        loaded = load_parallel(path, state, dtype=torch.float32)
        cut = shard_model(_copy(full), state)
        got, want = dict(loaded.named_parameters()), dict(cut.named_parameters())
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
        for part, share in ((".feed_forward.w", tp * ep), (".attention.w", tp)):  # 1/N of the split weights
            local = sum(p.numel() for n, p in got.items() if part in n)
            assert local * share == sum(p.numel() for n, p in full.named_parameters() if part in n), part


def test_mistral_layout_slices_match_hf(checkpoints, tmp_path):
    """An original-layout checkpoint (interleaved rotary rows) loads to the same tensor-parallel slices."""
    src = checkpoints["kv2"]
    config = MixtralConfig.from_pretrained(src)
    hd = config.head_dim
    tensors = {}
    for key, t in load_file(str(src / "model.safetensors")).items():
        key = (
            key.replace("model.embed_tokens", "tok_embeddings").replace("model.norm", "norm")
            .replace("lm_head", "output").replace("model.layers", "layers").replace("input_layernorm", "attention_norm")
            .replace("post_attention_layernorm", "ffn_norm").replace("block_sparse_moe", "feed_forward")
            .replace("self_attn.q_proj", "attention.wq").replace("self_attn.k_proj", "attention.wk")
            .replace("self_attn.v_proj", "attention.wv").replace("self_attn.o_proj", "attention.wo")
        )  # fmt: skip
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):  # half-split -> interleaved rows
            t = half_to_interleaved(t, t.shape[0] // hd)
        tensors[key] = t.contiguous()
    save_file(tensors, str(tmp_path / "consolidated.safetensors"))
    params = {
        "dim": config.hidden_size, "n_layers": config.num_hidden_layers, "head_dim": hd,
        "hidden_dim": config.intermediate_size, "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads, "norm_eps": config.rms_norm_eps, "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta, "moe": {"num_experts": config.num_experts, "num_experts_per_tok": 2},
    }  # fmt: skip
    (tmp_path / "params.json").write_text(json.dumps(params))
    for rank in range(2):
        state = ParallelState(tp=2, rank=rank)
        a = dict(load_parallel(src, state).named_parameters())
        b = dict(load_parallel(tmp_path, state).named_parameters())
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_size_errors_name_the_flag():
    config = MixtralConfig(
        vocab_size=64, hidden_size=48, intermediate_size=30, num_hidden_layers=1, num_attention_heads=6,
        num_key_value_heads=2, moe={"num_experts": 6, "num_experts_per_tok": 2},
    )  # fmt: skip
    with pytest.raises(ParallelError, match=r"--tp 4: must divide num_attention_heads \(6\)"):
        check_parallel(config, 4, 1)
    with pytest.raises(ParallelError, match=r"--tp 3: above num_key_value_heads \(2\) it must be a multiple"):
        check_parallel(config, 3, 1)
    with pytest.raises(ParallelError, match=r"--ep 4: must divide the number of experts \(6\)"):
        check_parallel(config, 1, 4)
    with pytest.raises(ParallelError, match=r"--tp 4 x --ep 1 = 4: must equal the number of processes"):
        check_world(4, 1, {"WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(ParallelError, match=r"WORLD_SIZE is not set"):
        check_world(2, 1, {})
    assert check_world(1, 1, {}) == (0, 0)
    assert expert_range(config, 3, 2) == slice(4, 6)


# ---- across processes: torchrun + gloo ----------------------------------------------------------


def _can_spawn() -> str | None:
    try:
        import torch.distributed as dist
    except ImportError:
        return "torch.distributed is not available"
    if not dist.is_available() or not dist.is_gloo_available():
        return "torch.distributed with gloo is not available"
    return None


needs_processes = pytest.mark.skipif(_can_spawn() is not None, reason=str(_can_spawn()))


def _run(cmd: list[str], timeout: float) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); on timeout stop it with SIGTERM, which torchrun forwards to its
    workers (no strays)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parent
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out}\n{err}")
    return proc.returncode, out, err


def _check_torchrun_logits(checkpoints: dict[str, Path], tmp_path: Path, modes: list[str], ranks: int) -> None:
    results = tmp_path / "logits.pt"
    args = [str(results), ",".join(modes)] + [f"{name}={path}" for name, path in checkpoints.items()]
    torchrun = [*TORCHRUN[:-1], str(ranks)]
    rc, out, err = _run([*torchrun, __file__, *args], timeout=120 * ranks // 2)
    assert rc == 0, out + err
    got = torch.load(results)
    for name, path in checkpoints.items():
        single = _load_single(path)
        want = _forward_both_ways(single, single.config.num_key_value_heads)["full"]
        for mode in modes:
            for how in ("full", "cached"):
                diff = (got[f"{mode}/{name}/{how}"] - want).abs().max().item()
                assert diff <= 1e-4, (mode, name, how, diff)
            # each rank holds exactly 1/ranks of the expert weights
            assert got[f"{mode}/{name}/expert-fraction"] == [1 / ranks] * ranks


@needs_processes
def test_torchrun_tp2_and_ep2_logits_equal_single_process(checkpoints, tmp_path):
    """2 ranks, gloo: --tp 2 and --ep 2 logits (whole prompt and cached decode) = single process, <= 1e-4."""
    _check_torchrun_logits(checkpoints, tmp_path, ["tp2", "ep2"], 2)


@pytest.mark.slow
@needs_processes
def test_torchrun_tp2_ep2_on_four_ranks_equal_single_process(checkpoints, tmp_path):
    """4 ranks, gloo: --tp 2 --ep 2 logits = single process, <= 1e-4."""
    _check_torchrun_logits(checkpoints, tmp_path, ["tp2ep2"], 4)


def test_a_rank_that_never_starts_is_a_timeout_error(monkeypatch):
    """Rank 0 of 2 whose peer never comes: a ParallelError naming the timeout after ~3 s, no hang."""
    import socket

    from mixtral_lite.parallel import init_parallel

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    start = time.monotonic()
    with pytest.raises(ParallelError, match=r"rank 0: could not join the 2 processes within 3 s"):
        init_parallel(2, 1, "cpu", timeout_s=3)
    assert time.monotonic() - start < 15


@pytest.fixture(scope="module")
def gen_folder(tmp_path_factory) -> Path:
    """A tiny model with a real tokenizer, for the command line."""
    from gen_fixtures import make_model_folder

    path = tmp_path_factory.mktemp("gen")
    make_model_folder(path, seed=5, num_key_value_heads=2)
    return path


def _generate_args(folder: Path) -> list[str]:
    return ["-m", "mixtral_lite", "generate", "--model", str(folder), "--prompt", "The capital of France is",
            "--max-new-tokens", "12", "--device", "cpu", "--quiet-stats"]  # fmt: skip


@needs_processes
def test_torchrun_generate_tp2_prints_the_single_process_text(gen_folder, capsys):
    """`torchrun --nproc-per-node 2 -m mixtral_lite generate --tp 2`, greedy: the same stdout, printed once."""
    from mixtral_lite.cli import main

    assert main(_generate_args(gen_folder)[2:]) == 0  # the single-process run, in this process
    single = capsys.readouterr().out
    assert len(single.strip()) > 0
    rc, out, err = _run([*TORCHRUN, *_generate_args(gen_folder), "--tp", "2"], timeout=120)
    assert rc == 0, err
    assert out == single


@needs_processes
def test_torchrun_serve_tp2_answers_as_the_single_process_model(gen_folder):
    """`torchrun --nproc-per-node 2 -m mixtral_lite serve --tp 2`: rank 0 serves HTTP, both ranks run
    every step; concurrent greedy completions equal generate() of the single-process model, and
    SIGTERM to torchrun ends the job within a minute."""
    import signal
    import threading

    import httpx

    from mixtral_lite import generate, load_model, load_tokenizer

    prompts = ["The capital of France is", "Once upon a time", "a b c"]
    single, tok = load_model(gen_folder, dtype=torch.float32), load_tokenizer(gen_folder)
    want = [generate(single, tok, p, max_new_tokens=10).text for p in prompts]
    cmd = [*TORCHRUN, "-m", "mixtral_lite", "serve", "--model", str(gen_folder), "--tp", "2", "--port", "0",
           "--max-batch", "4", "--device", "cpu", "--dtype", "float32"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, seen = None, []
        for line in proc.stderr:
            seen.append(line)
            if " at http://127.0.0.1:" in line:
                url = line.split(" at ")[1].split()[0]
                break
        assert url is not None, "".join(seen)
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        got = [None] * len(prompts)

        def ask(i: int) -> None:
            body = {"model": gen_folder.name, "prompt": prompts[i], "max_tokens": 10, "temperature": 0}
            got[i] = httpx.post(f"{url}/completions", json=body, timeout=120).json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=150)
        assert got == want
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it, then exits non-zero itself (its own rule)
        proc.wait(timeout=60)  # every rank ends: rank 0 shuts down, the others stop with it
    finally:
        if proc.poll() is None:
            proc.kill()


@needs_processes
def test_bad_world_size_exits_nonzero_on_every_rank_quickly(gen_folder):
    """--tp 2 --ep 2 with 2 processes: both ranks print the reason and exit 2 before joining, in seconds."""
    cmd = [PY, *_generate_args(gen_folder), "--tp", "2", "--ep", "2"]
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent,
            env={**os.environ, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        for r in range(2)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert time.monotonic() - start < 30
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 2, err
        assert "--tp 2 x --ep 2 = 4: must equal the number of processes, got WORLD_SIZE=2" in err
        assert "Traceback" not in err


def test_sizes_are_checked_before_joining(monkeypatch, checkpoints):
    """--tp 3 on a model with 4 heads fails on every rank before any rank waits for another."""
    from mixtral_lite.parallel import start_parallel

    for key, value in {"WORLD_SIZE": "3", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # joining would fail differently: it is never tried
    config = MixtralConfig.from_pretrained(checkpoints["kv2"])
    with pytest.raises(ParallelError, match=r"--tp 3: must divide num_attention_heads \(4\)"):
        start_parallel(3, 1, "cpu", config=config)


# ---- the worker (run by torchrun) ---------------------------------------------------------------


def _worker(argv: list[str]) -> int:
    """torchrun ... test_parallel.py OUT MODE,MODE NAME=DIR...: rank 0 saves every mode's logits to OUT."""
    import torch.distributed as dist

    from mixtral_lite.parallel import init_parallel, shutdown

    out, modes, ckpts = Path(argv[0]), argv[1].split(","), dict(a.split("=", 1) for a in argv[2:])
    torch.set_num_threads(1)
    results: dict[str, object] = {}
    state = None
    for mode in modes:
        state = init_parallel(*MODES[mode], "cpu", timeout_s=60)
        for name, path in ckpts.items():
            model = load_parallel(path, state, dtype=torch.float32)
            for how, logits in _forward_both_ways(model, local_kv_heads(model)).items():
                results[f"{mode}/{name}/{how}"] = logits
            c = model.config
            experts = sum(p.numel() for n, p in model.named_parameters() if ".feed_forward.w" in n)
            experts_all = c.num_hidden_layers * 3 * c.num_experts * c.hidden_size * c.intermediate_size
            fractions: list[float] = [0.0] * state.world_size
            dist.all_gather_object(fractions, experts / experts_all)
            results[f"{mode}/{name}/expert-fraction"] = fractions
    if state.is_main:
        torch.save(results, out)
    shutdown(state)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))


def _start_pair(folder: Path, extra: list[str]) -> list[subprocess.Popen]:
    """Two ranks of `generate --tp 2`, joined by hand (no torchrun: the test signals one rank)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [PY, *_generate_args(folder), "--tp", "2", "--temperature", "1", "--seed", "0", *extra]
    base = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).parent,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"},
        )
        for r in range(2)
    ]


@needs_processes
@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_a_peer_that_stops_or_dies_mid_generation_ends_the_job_in_seconds(gen_folder, how):
    """Rank 1 SIGSTOPped (or SIGKILLed) once rank 0 has streamed text: rank 0 exits 1 within the
    3 s step timeout plus start-up slack, with one line naming the cause and no traceback."""
    import signal

    procs = _start_pair(gen_folder, ["--max-new-tokens", "100000", "--step-timeout", "3"])
    try:
        first = procs[0].stdout.read(1)  # rank 0 streams its first piece after prefill
        assert first, procs[0].stderr.read().decode()
        procs[1].send_signal(signal.SIGSTOP if how == "stopped" else signal.SIGKILL)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = err.decode()
    assert procs[0].returncode == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "building the CPU kernel" not in line]
    assert len(lines) == 1, err
    want = "a peer rank stopped answering" if how == "stopped" else "lost a peer rank"
    assert lines[0].startswith(f"mixtral-lite generate: error: rank 0: {want} during generation"), err
    assert waited < (20 if how == "stopped" else 10), waited


def test_step_timeout_must_be_positive(gen_folder):
    """--step-timeout 0 is refused before joining."""
    cmd = [PY, *_generate_args(gen_folder), "--tp", "2", "--step-timeout", "0"]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent, env=env, timeout=60)
    assert out.returncode == 2
    assert "--step-timeout: expected a positive number of seconds, got 0.0" in out.stderr
