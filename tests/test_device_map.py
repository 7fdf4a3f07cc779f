"""Device maps: the pure planner with made-up free memory, explicit maps, per-layer devices."""

from __future__ import annotations

import pytest
import torch

from mixtral_lite import Mixtral, MixtralConfig, count_parameters
from mixtral_lite.errors import UserError
from mixtral_lite.weights.device_map import (
    check_device,
    device_of,
    layer_devices,
    module_bytes,
    parse_device_map,
    plan_device_map,
    resolve_device_map,
)

GB = 10**9
M8x7B = MixtralConfig.from_preset("mixtral-8x7b")
BF16_BYTES = 46_702_792_704 * 2  # REFERENCE.md parameter count, two bytes each


def test_module_bytes_add_up_to_the_parameter_count():
    sizes = module_bytes(M8x7B, torch.bfloat16)
    assert sum(sizes) == BF16_BYTES
    layer = sizes[1]
    assert sizes[0] == layer + 32000 * 4096 * 2  # embedding with layer 0
    assert sizes[-1] == layer + 32000 * 4096 * 2 + 4096 * 2  # lm_head and norm with the last layer
    tiny = MixtralConfig.from_preset("tiny")
    assert sum(module_bytes(tiny, torch.float32)) == count_parameters(tiny).total * 4


def test_two_equal_gpus_split_in_half():
    plan = plan_device_map(M8x7B, torch.bfloat16, {"cuda:0": 80 * GB, "cuda:1": 80 * GB})
    assert plan == ["cuda:0"] * 16 + ["cuda:1"] * 16


def test_split_follows_free_memory():
    """3:1 free memory -> 24 and 8 of the 32 layers (within one layer)."""
    plan = plan_device_map(M8x7B, torch.bfloat16, {"cuda:0": 120 * GB, "cuda:1": 40 * GB})
    assert plan == sorted(plan)  # layers stay in order
    assert abs(plan.count("cuda:0") - 24) <= 1
    four = plan_device_map(M8x7B, torch.bfloat16, {f"cuda:{i}": 30 * GB for i in range(4)})
    assert [four.count(f"cuda:{i}") for i in range(4)] == [8, 8, 8, 8]


def test_a_device_with_no_room_is_skipped():
    plan = plan_device_map(M8x7B, torch.bfloat16, {"cuda:0": 0, "cuda:1": 141 * GB})
    assert plan == ["cuda:1"] * 32


def test_plan_respects_each_budget():
    free = {"cuda:0": 50 * GB, "cuda:1": 60 * GB}
    plan = plan_device_map(M8x7B, torch.bfloat16, free)
    sizes = module_bytes(M8x7B, torch.bfloat16)
    for dev, cap in free.items():
        assert sum(s for s, d in zip(sizes, plan, strict=True) if d == dev) <= cap * 0.9


def test_does_not_fit_names_bytes_needed_and_available():
    with pytest.raises(UserError) as err:
        plan_device_map(M8x7B, torch.bfloat16, {"cuda:0": 40 * GB, "cuda:1": 40 * GB})
    msg = str(err.value)
    assert f"{BF16_BYTES:,} bytes" in msg and "93.41 GB" in msg  # needed
    assert f"{72 * GB:,} bytes" in msg and "cuda:0 36.00 GB" in msg  # available after the 10% reserve


def test_layer_granularity_does_not_fit():
    """Enough bytes in total (a quarter layer spare), but layers are not split: cuda:0 holds layer 0
    and half a layer of room, so the last layer finds a quarter layer too little on cuda:1."""
    sizes = module_bytes(M8x7B, torch.bfloat16)
    layer = sizes[1]
    free = {"cuda:0": sizes[0] + layer // 2, "cuda:1": sum(sizes) - sizes[0] - layer // 4}
    with pytest.raises(UserError, match=rf"layer 31 needs .*\({sizes[-1]:,} bytes\) but cuda:1 has"):
        plan_device_map(M8x7B, torch.bfloat16, free, headroom=0.0)
    free["cuda:1"] += layer // 2
    assert plan_device_map(M8x7B, torch.bfloat16, free, headroom=0.0) == ["cuda:0"] + ["cuda:1"] * 31


def test_headroom_is_a_parameter():
    free = {"cuda:0": BF16_BYTES}
    with pytest.raises(UserError, match="does not|needs"):
        plan_device_map(M8x7B, torch.bfloat16, free)
    assert plan_device_map(M8x7B, torch.bfloat16, free, headroom=0.0) == ["cuda:0"] * 32


def test_explicit_maps():
    assert parse_device_map({"0-15": "cuda:0", "16-31": "cuda:1"}, 32) == ["cuda:0"] * 16 + ["cuda:1"] * 16
    assert parse_device_map("0-1=cuda:0, 2=cuda:1,3=cpu", 4) == ["cuda:0", "cuda:0", "cuda:1", "cpu"]
    assert parse_device_map(["cpu", "cuda:1"], 2) == ["cpu", "cuda:1"]
    assert parse_device_map({0: "cpu", 1: "cpu"}, 2) == ["cpu", "cpu"]


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"0-2": "cpu"}, r"no device for layer\(s\) 3"),
        ({"0-3": "cpu", "3": "cpu"}, "layer 3 is given twice"),
        ({"0-4": "cpu"}, "outside layers 0-3"),
        ({"a-b": "cpu"}, "expected a layer or range"),
        (["cpu"] * 3, r"one device per layer \(4\), got 3"),
        ("0-3:cpu", "LAYERS=DEVICE"),
        (7, "expected 'auto', a list or a dict"),
    ],
)
def test_explicit_map_errors(spec, match):
    with pytest.raises(UserError, match=match):
        parse_device_map(spec, 4)


def test_check_device():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="expected cpu, cuda or cuda:N"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            check_device("cuda:1")
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device_map("auto", MixtralConfig.from_preset("tiny"), torch.bfloat16)


def test_resolve_and_layer_devices():
    tiny = MixtralConfig.from_preset("tiny")
    assert resolve_device_map({"0-1": "cpu"}, tiny, torch.float32) == [torch.device("cpu")] * 2
    assert layer_devices(Mixtral(tiny)) == [torch.device("cpu")] * 2


def test_device_of():
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert device_of("layers.1.feed_forward.w1", devices, tied=False) == devices[1]
    assert device_of("layers.0.attention.wq.weight", devices, tied=False) == devices[0]
    assert device_of("tok_embeddings.weight", devices, tied=False) == devices[0]
    assert device_of("norm.weight", devices, tied=False) == devices[1]
    assert device_of("output.weight", devices, tied=False) == devices[1]
    assert device_of("norm.weight", devices, tied=True) == devices[0]  # the lm_head is the embedding
