"""Weights moved onto 2 MiB pages (``cpu/hugepages.py``) keep their values, parameters and names,
the model's logits stay bit for bit the same, the kernel asks for (and here gets) huge pages, and
``MIXTRAL_LITE_HUGEPAGES=0`` leaves every weight where it was."""

from __future__ import annotations

import pytest
import torch

from mixtral_lite import KVCache, Mixtral, MixtralConfig, install_cpu_kernels, uninstall_cpu_kernels
from mixtral_lite.cpu import hugepages

pytestmark = pytest.mark.skipif(not hugepages.available(), reason="no transparent huge pages here")


def _huge_kb(address: int) -> int:
    """AnonHugePages of the mapping that holds ``address`` (/proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_copy_is_aligned_equal_and_on_huge_pages() -> None:
    t = torch.randn(3 * 2**20 + 5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 6 MiB + 10 B
    c = hugepages.huge_page_copy(t)
    assert torch.equal(c, t) and c.dtype == t.dtype and c.shape == t.shape and c.is_contiguous()
    assert c.data_ptr() % hugepages.HUGE == 0 and hugepages.on_huge_pages(c) and not hugepages.on_huge_pages(t)
    assert _huge_kb(c.data_ptr()) >= 2048  # at least one of its three whole 2 MiB pages
    del t
    assert c.float().sum().isfinite()  # the mapping lives as long as the tensor


def _model(dtype: torch.dtype) -> Mixtral:
    c = MixtralConfig.from_dict({**MixtralConfig.from_preset("tiny").to_dict(), "intermediate_size": 8192})
    model = Mixtral(c).to(dtype).eval()
    model.reset_parameters(generator=torch.Generator().manual_seed(1))
    return model


def _decode(model: Mixtral) -> torch.Tensor:
    cache = KVCache(model.config, 1, 8, dtype=model.dtype)
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]), cache=cache, slots=torch.arange(3))
        return model(torch.tensor([[6]]), cache=cache, slots=torch.tensor([3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_install_moves_large_weights_and_changes_nothing_else(dtype: torch.dtype, monkeypatch) -> None:
    model = _model(dtype)
    params = dict(model.named_parameters())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setenv("MIXTRAL_LITE_HUGEPAGES", "0")
    install_cpu_kernels(model)
    assert not any(hugepages.on_huge_pages(p) for p in model.parameters()) and not model.cpu_kernels.huge_pages
    plain = _decode(model)
    monkeypatch.delenv("MIXTRAL_LITE_HUGEPAGES")
    report = install_cpu_kernels(model)
    big = [n for n, p in model.named_parameters() if p.numel() * p.element_size() >= hugepages.MIN_BYTES]
    moved = [n for n, p in model.named_parameters() if hugepages.on_huge_pages(p)]
    assert moved and set(moved) == {n for n in big if not n.startswith("tok_embeddings")}, (moved, big)
    assert f"{len(moved)} weights" in report.huge_pages
    assert all(params[n] is p for n, p in model.named_parameters())  # the same Parameter objects
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_decode(model), plain)  # the layer plans followed the new addresses
    assert model.layers[0]._layer_plan.ok
    addresses = [p.data_ptr() for p in model.parameters()]
    install_cpu_kernels(model)  # again: nothing moves twice
    assert [p.data_ptr() for p in model.parameters()] == addresses
    uninstall_cpu_kernels(model)
    torch.testing.assert_close(_decode(model).float(), plain.float(), rtol=0.02, atol=0.02)
