"""The training loop: AdamW, linear warmup then cosine decay, gradient clipping, balance losses,
auxiliary-loss-free bias updates, periodic validation with load metrics, and exact resuming.

A run is defined by its model config, its ``TrainConfig`` and its data; every random draw comes
from two explicit generators (initialisation, data windows), so a run resumed from a saved state
reproduces the uninterrupted run step for step. A saved folder holds the model in the Hugging Face
layout (``saving.save_pretrained``), ``tokenizer.model`` when there is one, ``training_state.pt``
(step, optimizer, data generator, history) and ``train_log.json`` (the history, readable).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import MixtralConfig
from ..errors import UserError
from ..model.mixtral import Mixtral, SparseMoE
from ..model.routing import Routing, expert_load, update_bias
from .data import TokenData
from .losses import balance_loss, layer_stats, summarize, z_loss

STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.json"
STATE_KEYS = ("step", "losses", "val", "data_signature", "train_config", "optimizer", "data_rng")
BALANCE_CHOICES = ("auto", "switch", "deepseek", "importance", "none")


@dataclass
class TrainConfig:
    """Training hyper-parameters (the ``train`` section of a training config file)."""

    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 1e-3
    warmup: int = 100
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    bf16: bool = False  # bfloat16 autocast (weights and optimizer stay float32)
    balance_loss: str = "auto"  # auto: importance for soft, none with bias balancing, else switch
    aux_coef: float = 0.02  # weight of the balance loss (Mixtral's router_aux_loss_coef)
    z_coef: float = 0.0  # weight of the router z-loss (ST-MoE uses 1e-3)
    eval_interval: int = 200  # validate every this many steps (and at the end)
    eval_batches: int = 8
    val_fraction: float = 0.1
    init_std: float = 0.02
    seed: int = 0
    save_interval: int = 0  # also save every this many steps (0: only at the end)

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("lr", "init_std"):
            if not getattr(self, name) > 0:
                raise UserError(f"train.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"train.{name}: must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"train.val_fraction: must be in (0, 1), got {self.val_fraction}")
        if not 0 <= self.seed < 2**63 - 1:
            raise UserError(f"train.seed: must be in [0, 2**63 - 1), got {self.seed}")
        for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"train.{name}: must be a positive integer, got {value!r}")
        for name in ("warmup", "save_interval"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"train.min_lr: must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.balance_loss not in BALANCE_CHOICES:
            raise UserError(f"train.balance_loss: expected one of {BALANCE_CHOICES}, got {self.balance_loss!r}")
        for name in ("weight_decay", "grad_clip", "aux_coef", "z_coef", "init_std"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name}: must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "train") -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"{source}: unknown field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**data)


def _check_types(cfg: TrainConfig) -> None:
    """Every field of the type its default has; floats finite (``inf`` would wreck the run silently)."""
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), f.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            kind = "a finite number" if isinstance(default, float) else f"a {type(default).__name__}"
            raise UserError(f"train.{f.name}: expected {kind}, got {value!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` down to ``min_lr`` at ``steps``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def resolve_balance(cfg: TrainConfig, model_config: MixtralConfig) -> str:
    """The balance loss ``auto`` stands for, given the router."""
    if cfg.balance_loss != "auto":
        return cfg.balance_loss
    moe = model_config.moe
    if moe.bias_balancing:
        return "none"
    return "importance" if moe.kind == "soft" else "switch"


def check_run(model_config: MixtralConfig, cfg: TrainConfig) -> None:
    """Raise a ``UserError`` when the training settings do not fit the model."""
    if cfg.seq_len > model_config.max_position_embeddings:
        limit = model_config.max_position_embeddings
        raise UserError(f"seq_len: {cfg.seq_len} exceeds the model's max_position_embeddings ({limit})")
    # A lower bound of one step's memory: the logits, their float copy and their gradient.
    need = 3 * 4 * cfg.batch_size * cfg.seq_len * model_config.vocab_size
    have = _physical_memory()
    if have and need > have:
        raise UserError(
            f"batch_size: {cfg.batch_size} x seq_len {cfg.seq_len} needs at least {need / 2**30:,.1f} GiB for "
            f"the logits alone, more than this machine's {have / 2**30:,.1f} GiB"
        )


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_writable(out_dir: str | Path) -> None:
    """Fail before the first step, not at the first save, when ``out_dir`` cannot be written."""
    out = Path(out_dir)
    for folder in (out.parent, out) if out.is_dir() else (out.parent,):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise UserError(f"--out {out}: cannot write to {folder} ({exc.strerror or exc})") from None


def moe_layers(model: Mixtral) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def take_routings(layers: list[SparseMoE]) -> list[Routing]:
    """The routing of the last forward of each layer, cleared so no graph outlives its step."""
    routings = [m.last_routing for m in layers]
    for m in layers:
        m.last_routing = None
    return [r for r in routings if r is not None]


def make_optimizer(model: Mixtral, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norm gains do not."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


@dataclass
class TrainResult:
    model: Mixtral
    losses: list[float]  # training cross-entropy per step, from step 0 (resumed runs include the past)
    val: list[dict[str, Any]] = field(default_factory=list)  # {"step", "val_loss", "load_cv", "max_vio", ...}
    tokens_per_s: float = 0.0  # training throughput of this invocation (evaluation excluded)
    step: int = 0  # steps done

    @property
    def final_val(self) -> dict[str, Any]:
        return self.val[-1] if self.val else {}


@torch.no_grad()
def evaluate(model: Mixtral, batches: list[tuple[torch.Tensor, torch.Tensor]], bf16: bool = False) -> dict[str, Any]:
    """Mean validation cross-entropy and the routers' load metrics (eval mode: no capacity drops)."""
    was_training = model.training
    model.eval()
    layers = moe_layers(model)
    flags = [m.record_routing for m in layers]
    for m in layers:
        m.record_routing = True
    total, per_layer = 0.0, [[] for _ in layers]
    try:
        for x, y in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
            for i, r in enumerate(take_routings(layers)):
                per_layer[i].append(r)
    finally:
        for m, flag in zip(layers, flags, strict=True):
            m.record_routing = flag
        model.train(was_training)
    result: dict[str, Any] = {"val_loss": total / len(batches)}
    if layers:
        merged = [_concat(rs) for rs in per_layer]
        stats = layer_stats(merged)
        result.update(summarize(stats))
        result["share"] = [[round(v, 4) for v in s.share] for s in stats]
    return result


def _concat(routings: list[Routing]) -> Routing:
    first = routings[0]
    return Routing(
        torch.cat([r.logits for r in routings]),
        torch.cat([r.idx for r in routings]),
        torch.cat([r.weights for r in routings]),
        None if first.probs is None else torch.cat([r.probs for r in routings]),
    )


def train(
    model_config: MixtralConfig,
    cfg: TrainConfig,
    data: TokenData,
    out_dir: str | Path | None = None,
    *,
    resume: str | Path | None = None,
    stop_at: int | None = None,
    tokenizer_file: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    data_file: str | Path | None = None,
) -> TrainResult:
    """Train (or continue training) and save to ``out_dir`` (None: do not save).

    ``resume``: a folder saved by this function; the model, optimizer, data position and history
    continue from it (``model_config`` and ``cfg`` should be the ones it was saved with, except
    ``steps``). ``stop_at``: stop after this step although the schedule spans ``cfg.steps`` (an
    interrupted run, to be resumed). ``data_file``: recorded in the saved state, so that a resumed
    run can find its text without being told again.
    """
    from tqdm.auto import tqdm

    check_run(model_config, cfg)
    if out_dir is not None:
        check_writable(out_dir)
    data.check(cfg.seq_len, model_config.vocab_size)
    signature = data.signature()
    model = Mixtral(model_config)
    model.reset_parameters(std=cfg.init_std, generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    optimizer = make_optimizer(model, cfg)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    val_history: list[dict[str, Any]] = []
    start = 0
    if resume is not None:
        start, losses, val_history = _restore(Path(resume), model, optimizer, data_gen, signature)
    layers = moe_layers(model)
    for m in layers:
        m.record_routing = True
    balance = resolve_balance(cfg, model_config)
    bos = model_config.bos_token_id
    val_batches = data.val_batches(cfg.batch_size, cfg.seq_len, cfg.eval_batches, bos)
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    say = log or (lambda s: tqdm.write(s))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    train_time = 0.0
    dropped: list[float] = []  # capacity drops (hard routing) per step since the last evaluation
    bar = tqdm(total=end, initial=start, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, end):
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = data.sample(cfg.batch_size, cfg.seq_len, data_gen, bos)
            try:
                ce, routings = train_step(model, optimizer, layers, x, y, cfg, balance)
            except Diverged as exc:
                kept = f"; nothing saved, {out_dir} keeps its last checkpoint" if out_dir is not None else ""
                raise Diverged(f"step {step + 1}: {exc}{kept}") from None
            if routings and routings[0].kept is not None:
                dropped.append(sum(r.dropped / r.idx.shape[0] for r in routings) / len(routings))
            del routings
            losses.append(ce)
            dt = time.perf_counter() - t0
            train_time += dt
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
            done = step + 1
            if done % cfg.eval_interval == 0 or done == cfg.steps:
                metrics = {"step": done, "train_loss": losses[-1], **evaluate(model, val_batches, cfg.bf16)}
                if dropped:
                    metrics["train_dropped"] = sum(dropped) / len(dropped)
                    dropped = []
                val_history.append(metrics)
                say(_format_eval(metrics))
            if out_dir is not None and cfg.save_interval and done % cfg.save_interval == 0 and done != end:
                state = TrainState(done, losses, val_history, signature, _path(data_file))
                save_training(out_dir, model, optimizer, data_gen, cfg, state, tokenizer_file)
    finally:
        bar.close()
    done = max(start, end)
    if out_dir is not None:
        state = TrainState(done, losses, val_history, signature, _path(data_file))
        save_training(out_dir, model, optimizer, data_gen, cfg, state, tokenizer_file)
    tps = tokens_per_step * (end - start) / train_time if train_time else 0.0
    return TrainResult(model, losses, val_history, tps, done)


def train_step(
    model: Mixtral,
    optimizer: torch.optim.Optimizer,
    layers: list[SparseMoE],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    balance: str,
) -> tuple[float, list[Routing]]:
    """One optimizer step on inputs x and targets y [B, T]; returns the cross-entropy and the
    layers' routing (for metrics). Bias-balanced layers update
    their bias from this step's load after the optimizer step."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
        logits = model(x)
    ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    routings = take_routings(layers)
    if not math.isfinite(ce.item()):  # before the step: the weights stay as the last good step left them
        raise Diverged(f"training loss is {ce.item()} (the run diverged; lower --lr or check the data)")
    loss = ce
    if routings and balance != "none" and cfg.aux_coef > 0:
        loss = loss + cfg.aux_coef * balance_loss(balance, routings)
    if routings and cfg.z_coef > 0:
        loss = loss + cfg.z_coef * z_loss(routings)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    for m, r in zip(layers, routings, strict=True):
        if m.moe_config.bias_balancing:
            update_bias(m.expert_bias, expert_load(r.idx, m.w1.shape[0]), m.moe_config.bias_update_speed)
    return ce.item(), routings


def _format_eval(m: dict[str, Any]) -> str:
    line = f"step {m['step']}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}"
    if "load_cv" in m:
        line += f", load CV {m['load_cv']:.3f}, MaxVio {m['max_vio']:.3f} (worst layer {m['max_vio_worst']:.3f})"
    if "train_dropped" in m:
        line += f", dropped in training {100 * m['train_dropped']:.1f}%"
    return line


class Diverged(UserError):
    """A non-finite loss: the run stops and nothing is saved."""


@dataclass
class TrainState:
    step: int
    losses: list[float]
    val: list[dict[str, Any]]
    data_signature: list[int]  # token counts and id sums of both splits: resuming on other data is an error
    data_file: str | None = None  # absolute path of the text trained on (``--resume`` without ``--data``)


def _path(file: str | Path | None) -> str | None:
    return None if file is None else str(Path(file).resolve())


def save_training(
    out_dir: str | Path,
    model: Mixtral,
    optimizer: torch.optim.Optimizer,
    data_gen: torch.Generator,
    cfg: TrainConfig,
    state: TrainState,
    tokenizer_file: str | Path | None,
) -> Path:
    """Model (HF layout), tokenizer, resumable state and a readable log into ``out_dir``.

    One checkpoint is one folder, built whole beside ``out_dir`` and switched in by one rename
    (``mixtral_lite.atomic``): weights, optimizer, data position and step always belong together,
    and a save killed at any point leaves the previous checkpoint complete. Non-finite weights are
    never saved.
    """
    from ..atomic import atomic_folder
    from ..weights.saving import is_pretrained_file, save_pretrained

    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise Diverged(f"step {state.step}: non-finite weights ({', '.join(bad[:3])}); not saved over {out_dir}")
    out = Path(out_dir)
    new_tokenizer = tokenizer_file is not None and Path(tokenizer_file).resolve() != (out / "tokenizer.model").resolve()
    ours = {STATE_FILE, LOG_FILE} | ({"tokenizer.model"} if new_tokenizer else set())
    with atomic_folder(out, keep=lambda name: not is_pretrained_file(name) and name not in ours) as tmp:
        save_pretrained(model, out, into=tmp)
        if new_tokenizer:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
        log = {"train_config": dataclasses.asdict(cfg), **dataclasses.asdict(state)}
        torch.save({**log, "optimizer": optimizer.state_dict(), "data_rng": data_gen.get_state()}, tmp / STATE_FILE)
        (tmp / LOG_FILE).write_text(json.dumps(log, indent=1) + "\n")
    return out


def read_state(folder: str | Path) -> dict[str, Any]:
    """The resumable state, checked: a clear error for a file that is not one, never a ``KeyError``."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise UserError(f"--resume: {folder}: no {STATE_FILE} (not a folder saved by mixtral-lite train)")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # unpickling refused, truncated, not a torch file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--resume: {path}: not a readable training state: {first}") from None
    if not isinstance(state, dict):
        raise UserError(f"--resume: {path}: expected a dict, got {type(state).__name__}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise UserError(f"--resume: {path}: missing {', '.join(missing)} (expected {', '.join(STATE_KEYS)})")
    if not isinstance(state["train_config"], dict) or not isinstance(state["step"], int):
        raise UserError(f"--resume: {path}: train_config must be a dict and step an integer")
    return state


def _restore(
    folder: Path, model: Mixtral, optimizer: torch.optim.Optimizer, data_gen: torch.Generator, signature: list[int]
) -> tuple[int, list[float], list[dict[str, Any]]]:
    from ..weights.loading import load_model

    state = read_state(folder)
    if list(state["data_signature"]) != signature:
        raise UserError(f"--resume: {folder}: was trained on other data (or another tokenizer) than --data gives")
    saved = load_model(folder, cpu_kernels=False)  # training keeps the reference modules
    if saved.config != model.config:
        raise UserError(f"--resume: {folder}: its config.json differs from the model config of this run")
    model.load_state_dict(saved.state_dict())
    try:
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--resume: {folder / STATE_FILE}: optimizer or data_rng does not fit: {first}") from None
    return state["step"], list(state["losses"]), list(state["val"])


__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "train_step",
    "check_run",
    "evaluate",
    "lr_at",
    "make_optimizer",
    "moe_layers",
    "take_routings",
    "read_state",
    "save_training",
    "TrainState",
    "Diverged",
    "check_writable",
    "resolve_balance",
]
