"""Atomic saves: a save (or a training checkpoint) killed at random points leaves the old folder or
the new one, never a mix; a reader during saves gets one of the two, logits identical to it."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from mixtral_lite import Mixtral, MixtralConfig, load_model, save_pretrained
from mixtral_lite.training.train import TrainConfig, TrainState, make_optimizer, read_state, save_training

CONFIG = MixtralConfig.from_preset("tiny")
IDS = torch.randint(0, CONFIG.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))


def _model(seed: int) -> Mixtral:
    model = Mixtral(CONFIG)
    model.reset_parameters(std=0.2, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def _logits(model: Mixtral) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _kill_saves(folder, save_a, save_b, kills: int, seed: int) -> int:
    """Fork a child that saves A and B alternately forever; SIGKILL it after a random delay, then
    check the folder. Returns how many kills landed while a temporary folder existed (mid-save)."""
    rng = random.Random(seed)
    mid = 0
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # the child: save until killed
            try:
                while True:
                    save_b()
                    save_a()
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid += any(p.name.startswith(f".{folder.name}.tmp-") for p in folder.parent.iterdir())
        _check_folder(folder)
    return mid


def _check_folder(folder) -> None:
    got = _logits(load_model(folder, progress=False, cpu_kernels=False))  # the reference modules, as REFS
    assert any(torch.equal(got, ref) for ref in REFS), "the folder is neither the old nor the new checkpoint"


REFS: list[torch.Tensor] = []


@pytest.fixture(scope="module")
def models():
    a, b = _model(1), _model(2)
    REFS[:] = [_logits(a), _logits(b)]
    return a, b


def _check_kills(tmp_path, models, kills: int, seed: int) -> None:
    a, b = models
    folder = tmp_path / "ckpt"
    save_pretrained(a, folder, max_shard_size="100KB")
    (folder / "notes.txt").write_text("kept\n")
    mid = _kill_saves(
        folder,
        lambda: save_pretrained(a, folder, max_shard_size="100KB"),
        lambda: save_pretrained(b, folder, max_shard_size="100KB"),
        kills,
        seed,
    )
    assert (folder / "notes.txt").read_text() == "kept\n"  # files the save does not write are carried over
    assert mid >= 1  # some kills landed mid-save, not only between saves
    save_pretrained(a, folder)  # the next save cleans the killed saves' temporary folders
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")]


def test_save_pretrained_killed_15_times(tmp_path, models):
    _check_kills(tmp_path, models, kills=15, seed=0)


@pytest.mark.slow
def test_save_pretrained_killed_200_times(tmp_path, models):
    _check_kills(tmp_path, models, kills=200, seed=1)


def test_training_checkpoint_killed_12_times(tmp_path, models):
    """Weights, optimizer and step of a training checkpoint always belong to the same save."""
    a, b = models
    folder = tmp_path / "run"
    cfg = TrainConfig(steps=10)
    opt_a, opt_b = make_optimizer(a, cfg), make_optimizer(b, cfg)
    gen = torch.Generator().manual_seed(0)

    def save(model, opt, step):
        return lambda: save_training(folder, model, opt, gen, cfg, TrainState(step, [1.0] * step, [], [0]), None)

    save(a, opt_a, 5)()
    _kill_saves(folder, save(a, opt_a, 5), save(b, opt_b, 10), kills=12, seed=2)
    for _ in range(3):
        state = read_state(folder)
        weights = _logits(load_model(folder, progress=False, cpu_kernels=False))
        assert state["step"] == (5 if torch.equal(weights, REFS[0]) else 10)
        assert torch.equal(weights, REFS[0] if state["step"] == 5 else REFS[1])
        assert len(state["losses"]) == state["step"]


def test_concurrent_reader_never_sees_a_mix(tmp_path, models):
    a, b = models
    folder = tmp_path / "ckpt"
    save_pretrained(a, folder, max_shard_size="100KB")
    pid = os.fork()
    if pid == 0:
        try:
            while True:
                save_pretrained(b, folder, max_shard_size="100KB")
                save_pretrained(a, folder, max_shard_size="100KB")
        finally:
            os._exit(1)
    try:
        seen = [0, 0]
        for _ in range(30):  # 30 reads while saves run, each one save's folder
            got = _logits(load_model(folder, progress=False, cpu_kernels=False))  # the reference modules, as REFS
            match = [torch.equal(got, ref) for ref in REFS]
            assert any(match), "a read saw a mix of two saves"
            seen[match.index(True)] += 1
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert sum(seen) == 30
