"""The two implementations behind one interface: load, prefill, greedy generation, timed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.cache import KVCache
from .hardware import sync


@dataclass
class Run:
    """One greedy generation: tokens [B, n], call-to-first-token and later-token times."""

    tokens: list[list[int]]
    ttft: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        b, n = len(self.tokens), len(self.tokens[0])
        return b * (n - 1) / self.decode_s if self.decode_s > 0 else 0.0


class Engine:
    name: str
    model: torch.nn.Module
    load_s: float

    def prefill_s(self, ids: torch.Tensor) -> float:
        """Seconds for one forward pass over ids [B, T] that fills a fresh cache."""
        raise NotImplementedError

    def greedy(self, ids: torch.Tensor, n: int) -> Run:
        """n greedy tokens after ids [B, T] (EOS suppressed, as transformers' min_new_tokens)."""
        raise NotImplementedError


class Ours(Engine):
    """mixtral_lite: our own greedy loop over ``generate.prefill`` / ``generate.decode_step``."""

    def __init__(
        self, model: torch.nn.Module, name: str = "mixtral_lite", *, load_s: float = 0.0, compile: bool = False
    ):
        from ..generation.generate import compile_decode_step, decode_step

        self.model, self.name, self.load_s = model, name + (" compiled" if compile else ""), load_s
        self.device = model.device
        self.decode_fn = compile_decode_step(self.device) if compile else decode_step
        self.compiled = compile
        self.eos = model.config.eos_token_id

    @classmethod
    def load(
        cls, path: Path, dtype: torch.dtype, device: torch.device, *, quantize: str | None = None, compile: bool = False
    ) -> Ours:
        from ..weights.loading import load_model

        t0 = time.perf_counter()
        model = load_model(path, dtype=dtype, device=device, quantize=quantize, progress=False)
        sync(device)
        name = "mixtral_lite" + (f" {quantize}" if quantize else "")
        return cls(model, name, load_s=time.perf_counter() - t0, compile=compile)

    def _cache(self, b: int, length: int) -> KVCache:
        return KVCache(self.model.config, b, length, device=self.device, dtype=self.model.dtype)

    @torch.no_grad()
    def prefill_s(self, ids: torch.Tensor) -> float:
        from ..generation.generate import prefill

        cache = self._cache(*ids.shape)
        sync(self.device)
        t0 = time.perf_counter()
        prefill(self.model, ids, cache, None)
        sync(self.device)
        return time.perf_counter() - t0

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if self.eos is not None:
            logits[:, self.eos] = float("-inf")
        return logits.max(-1).indices  # = argmax (first maximum), 2x faster on the CPU

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor, n: int) -> Run:
        from ..generation.generate import prefill

        b, t = ids.shape
        t0 = time.perf_counter()
        cache = self._cache(b, t + n - 1)
        out = torch.empty(b, n, dtype=torch.long, device=self.device)
        out[:, 0] = self._pick(prefill(self.model, ids, cache, None))
        out[:, 0].tolist()  # the first tokens reach the host
        t1 = time.perf_counter()
        slot = torch.tensor([t], device=self.device)
        positions = torch.full((b, 1), t, device=self.device)
        for i in range(1, n):  # no host read inside the loop: tokens stay on the device
            logits = self.decode_fn(self.model, out[:, i - 1 : i], cache, slot, positions)
            out[:, i] = self._pick(logits)
            slot += 1
            positions += 1
        tokens = out.tolist()
        t2 = time.perf_counter()
        return Run(tokens, t1 - t0, t2 - t1)


class _Timestamps:
    """A transformers streamer that notes when each step's tokens reach the host."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class Theirs(Engine):
    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device, impl: str, cache: str) -> None:
        from transformers import MixtralForCausalLM

        self.name = f"transformers ({impl}, {cache} cache)"
        self.impl, self.cache_kind, self.device = impl, cache, device
        t0 = time.perf_counter()
        self.model = MixtralForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device))
        sync(device)
        self.load_s = time.perf_counter() - t0
        self.model.eval()
        self.set(impl, cache)

    def set(self, impl: str, cache: str) -> None:
        self.model.set_experts_implementation(impl)
        self.impl, self.cache_kind = impl, cache
        self.name = f"transformers ({impl}, {cache} cache)"

    @torch.no_grad()
    def prefill_s(self, ids: torch.Tensor) -> float:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        sync(self.device)
        t0 = time.perf_counter()
        self.model(ids, cache=cache, use_cache=True, logits_to_keep=1)
        sync(self.device)
        return time.perf_counter() - t0

    @torch.no_grad()
    def greedy(self, ids: torch.Tensor, n: int) -> Run:
        stamps = _Timestamps()
        kw = {"cache_implementation": "static"} if self.cache_kind == "static" else {}
        t0 = time.perf_counter()
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
            streamer=stamps,
            **kw,
        )
        t = stamps.times  # [prompt, token 1, ..., token n]
        return Run(out[:, ids.shape[1] :].tolist(), t[1] - t0, t[-1] - t[1])
