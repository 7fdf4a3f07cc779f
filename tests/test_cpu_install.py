"""Installing the CPU kernels: decided once for the model as it is, reported, reversible, and what
happens when the weights change afterwards (caught: the accelerated modules defer or rebuild)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mixtral_lite import (
    KVCache,
    Mixtral,
    MixtralConfig,
    cpu_kernels_status,
    install_cpu_kernels,
    uninstall_cpu_kernels,
)
from mixtral_lite.cpu import modules
from mixtral_lite.model import mixtral as reference

BUNDLED = Path(__file__).resolve().parents[1] / "mixtral_lite" / "bundled"


def _net(dtype: torch.dtype = torch.float32) -> Mixtral:
    torch.manual_seed(0)
    return Mixtral(MixtralConfig.from_preset("tiny")).to(dtype).eval()


def _decode(net: Mixtral, steps: int = 3) -> list[torch.Tensor]:
    ids = torch.randint(0, net.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    cache = KVCache(net.config, 2, 6 + steps, dtype=net.dtype)
    with torch.no_grad():
        out = [net(ids, cache=cache, slots=torch.arange(6))[:, -1]]
        for pos in range(6, 6 + steps):
            out.append(net(out[-1].argmax(-1, keepdim=True), cache=cache, slots=torch.tensor([pos]))[:, -1])
    return out


def test_plain_until_installed_and_back() -> None:
    net = _net()
    assert type(net) is reference.Mixtral and type(net.layers[0]) is reference.Block
    assert "not installed" in cpu_kernels_status(net)
    ref = _decode(net)
    report = install_cpu_kernels(net)
    assert report is net.cpu_kernels and str(report) == cpu_kernels_status(net)
    layers = net.config.num_hidden_layers
    assert report.installed["Block"] == layers and report.installed["SparseMoE"] == layers
    assert type(net.layers[0].attention) is modules.CpuAttention
    assert list(net.state_dict()) == list(_net().state_dict())  # names unchanged
    fast = _decode(net)
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    uninstall_cpu_kernels(net)
    assert type(net) is reference.Mixtral and not any(type(m).__name__.startswith("Cpu") for m in net.modules())
    assert net.cpu_kernels is None


def test_a_dtype_change_after_installing_is_caught() -> None:
    """``.to(bfloat16)`` after installing: the one-call layer rebuilds its plan for the new weights
    and the logits are the bfloat16 reference's (within bfloat16 rounding)."""
    net = _net()
    install_cpu_kernels(net)
    _decode(net)
    key = net.layers[0]._layer_plan.key
    net.to(torch.bfloat16)
    fast = _decode(net)
    assert net.layers[0]._layer_plan.key != key and net.layers[0]._layer_plan.ok
    ref = _decode(_net(torch.bfloat16))
    for a, b in zip(fast, ref, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


def test_autograd_sees_the_reference() -> None:
    """Training through an installed model computes exactly the reference's loss and gradients."""
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    grads = []
    for install in (False, True):
        net = _net().train()
        if install:
            install_cpu_kernels(net)
        loss = net(ids).logsumexp(-1).mean()
        loss.backward()
        grads.append((loss.detach(), net.layers[0].feed_forward.w1.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_modules_off_the_cpu_are_left_with_the_reason() -> None:
    with torch.device("meta"):
        net = Mixtral(MixtralConfig.from_preset("tiny"))
    report = install_cpu_kernels(net)
    assert not report.installed and report.skipped["Linear (on meta)"] > 0
    assert type(net) is reference.Mixtral


def test_generation_installs_once_and_respects_an_uninstall() -> None:
    from mixtral_lite.generation.generate import generate
    from mixtral_lite.generation.tokenizer import load_tokenizer
    from mixtral_lite.weights.loading import load_model

    net = load_model(BUNDLED, cpu_kernels=False)
    tok = load_tokenizer(BUNDLED)
    generate(net, tok, "ROMEO:", max_new_tokens=2)
    assert type(net) is modules.CpuMixtral
    uninstall_cpu_kernels(net)
    generate(net, tok, "ROMEO:", max_new_tokens=2)
    assert type(net) is reference.Mixtral  # uninstalled by the user: generation leaves it so


@pytest.mark.parametrize("flag", ["--verbose"])
def test_verbose_prints_the_status(flag: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mixtral_lite", "generate", "--prompt", "ROMEO:", "--max-new-tokens", "2", flag],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "CPU kernels: C kernel" in done.stderr and "accelerated" in done.stderr
