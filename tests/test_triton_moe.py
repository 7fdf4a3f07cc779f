"""The GPU backend's int8 MoE kernels (``mixtral_lite/cuda``), run for real without a GPU: on CPU
tensors the ops execute the same Triton kernels in Triton's interpreter. Checked against the
float32 per-expert loop (``experts_int8_reference``) with a stated bound, on shapes whose tiles
are partial and whose reductions take more than one step; on meta tensors (the fake GPU), the
bytes the ops read are the chosen experts'."""

from __future__ import annotations

import platform

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mixtral_lite import MixtralConfig
from mixtral_lite.bench.trace import meta_model, trace_decode
from mixtral_lite.cuda import install_cuda_kernels, uninstall_cuda_kernels
from mixtral_lite.cuda.modules import MAX_PAIRS, MAX_ROWS, CudaInt8Linear, CudaInt8MoE
from mixtral_lite.model.mixtral import SparseMoE
from mixtral_lite.model.quant import (
    Int8Linear,
    Int8MoE,
    dequantize,
    experts_int8_reference,
    linear_int8_reference,
    quantize_model,
    quantize_per_channel,
)

if platform.system() == "Linux":  # the test extra installs Triton there (no wheels elsewhere)
    import triton  # noqa: F401  (pip install -e '.[test]')
else:
    pytest.skip("Triton ships Linux wheels only", allow_module_level=True)

E, D, F, K = 6, 160, 200, 2  # D and F: partial tiles (32 outputs, 128 inputs a step), two steps each
# Unit roundoff of the hidden activations as stored between the two products: bf16 and fp16 are
# truncated by the interpreter (a full unit; a GPU rounds to nearest), float32 only accumulates.
UNIT = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-20}


def int8_moe(dtype: torch.dtype, seed: int = 0) -> Int8MoE:
    tiny = MixtralConfig.from_preset("tiny").to_dict()
    config = MixtralConfig.from_dict(
        {**tiny, "hidden_size": D, "intermediate_size": F, "moe": {"num_experts": E, "num_experts_per_tok": K}}
    )
    torch.manual_seed(seed)
    moe = SparseMoE(config)
    with torch.no_grad():
        for w in (moe.w1, moe.w2, moe.w3):
            w.normal_(0, D**-0.5)
    return Int8MoE(moe.to(dtype), dtype).eval()


def bound(x: torch.Tensor, moe: Int8MoE, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """|kernel - reference| <= u * sum_k w_k (|h_k| |W2_e|^T) + (output rounding) + float32 slack."""
    w2 = dequantize(moe.w2, moe.w2_scale).abs()
    w1, w3 = dequantize(moe.w1, moe.w1_scale), dequantize(moe.w3, moe.w3_scale)
    xf = x.float()
    out = torch.zeros(x.shape)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[n, k])
            h = torch.nn.functional.silu(xf[n] @ w1[e].T) * (xf[n] @ w3[e].T)
            out[n] += weights[n, k].abs() * (h.abs() @ w2[e].T)
    ref = experts_int8_reference(x.float(), moe, idx, weights).abs()
    out_unit = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-11 if x.dtype == torch.float16 else 2.0**-23
    return UNIT[x.dtype] * out + out_unit * ref + 1e-5 * (1 + ref)


ROUTINGS = {
    "one token": [[4, 1]],
    "rows share experts, two never chosen": [[0, 3], [3, 1], [0, 1], [1, 3]],
    "every expert, order reversed": [[5, 4], [3, 2], [1, 0]],
    "one expert twice": [[2, 2], [5, 2]],  # (a router never does this; the kernel must not care)
}


@pytest.mark.parametrize("routing", list(ROUTINGS), ids=list(ROUTINGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_kernel_matches_the_per_expert_loop(dtype: torch.dtype, routing: str) -> None:
    moe = int8_moe(dtype)
    install_cuda_kernels(moe, device_types=("cpu",))
    assert type(moe) is CudaInt8MoE
    idx = torch.tensor(ROUTINGS[routing])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(idx.shape[0], D, generator=g).to(dtype)
    weights = torch.rand(idx.shape, generator=g)
    with torch.no_grad():
        got = moe.experts(x, idx, weights)
    want = experts_int8_reference(x, moe, idx, weights)
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.float() - experts_int8_reference(x.float(), moe, idx, weights)).abs()
    assert (err <= bound(x, moe, idx, weights)).all(), err.max()
    assert not torch.equal(got, torch.zeros_like(got))


def test_unchosen_experts_cannot_reach_the_output() -> None:
    """NaN scales in the experts no row chose: every output stays finite (``each`` and ``dense``
    multiply every expert, weighted by 0: NaN)."""
    moe = int8_moe(torch.float32)
    idx = torch.tensor([[0, 3], [3, 0]])
    with torch.no_grad():
        for s in moe.scales():
            s[[1, 2, 4, 5]] = float("nan")
    install_cuda_kernels(moe, device_types=("cpu",))
    x = torch.randn(2, D)
    weights = torch.rand(2, K)
    with torch.no_grad():
        got = moe.experts(x, idx, weights)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, experts_int8_reference(x, moe, idx, weights), rtol=1e-5, atol=1e-5)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("n", [MAX_PAIRS // K, MAX_PAIRS // K + 1])
def test_the_kernel_takes_up_to_max_pairs(n: int) -> None:
    """Past ``MAX_PAIRS`` pairs (prefill) the kernel declines and ``Int8MoE``'s dispatch runs;
    either way the result is the per-expert loop's."""
    moe = int8_moe(torch.float32)
    install_cuda_kernels(moe, device_types=("cpu",))
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)])
    x, weights = torch.randn(n, D, generator=g), torch.rand(n, K, generator=g)
    with torch.no_grad(), _Ops() as ops:
        got = moe.experts(x, idx, weights)
    assert ("mixtral_lite::int8_moe_gate_up" in ops.names) == (n * K <= MAX_PAIRS)
    torch.testing.assert_close(got, experts_int8_reference(x, moe, idx, weights), rtol=1e-4, atol=1e-4)


def test_installed_only_where_the_weights_are() -> None:
    """The CPU model keeps ``Int8MoE`` by default (its own kernels are the CPU backend's); meta and
    CUDA get the GPU modules; uninstalling restores the class; quantising re-installs them."""
    moe = int8_moe(torch.float32)
    report = install_cuda_kernels(moe)
    assert type(moe) is Int8MoE and report.skipped == {"Int8MoE (on cpu)": 1}
    model = meta_model(layers=1)  # bf16 with the kernels installed: nothing to swap yet
    assert model.cuda_kernels.installed == {}
    quantize_model(model)
    assert type(model.layers[0].feed_forward) is CudaInt8MoE
    uninstall_cuda_kernels(model)
    assert type(model.layers[0].feed_forward) is Int8MoE


def test_meta_decode_reads_only_the_chosen_experts() -> None:
    """Batch 1 on Mixtral-8x7B's shapes: each op reads K of the E experts' int8 weights."""
    model = meta_model(layers=1, int8=True)
    moe = model.layers[0].feed_forward
    t = trace_decode(model, 1, 32, 64)
    ops = {op.name: op for op in t.ops if op.name.startswith("int8_moe")}
    assert set(ops) == {"int8_moe_gate_up", "int8_moe_down"}
    e, k = moe.n_experts, moe.top_k
    w13 = sum(t.numel() * t.element_size() for t in (moe.w1, moe.w3, moe.w1_scale, moe.w3_scale))
    assert w13 * k // e <= ops["int8_moe_gate_up"].read <= w13 * k // e + 2**16
    every = meta_model(layers=1, int8=True, kernels=False)  # the reference: ``each`` reads all E
    assert trace_decode(every, 1, 32, 64).bytes > 3 * t.bytes


@pytest.mark.parametrize("rows", [1, 5, MAX_ROWS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_linear_kernel_matches_the_float32_product(dtype: torch.dtype, rows: int) -> None:
    """The plain int8 matrix (partial output tile, two reduction steps), up to ``MAX_ROWS`` rows:
    float32 accumulation, one rounding to the activations' dtype (truncated in the interpreter)."""
    g = torch.Generator().manual_seed(3)
    layer = Int8Linear(*quantize_per_channel(torch.randn(72, D, generator=g), dtype))
    install_cuda_kernels(layer, device_types=("cpu",))
    assert type(layer) is CudaInt8Linear
    x = torch.randn(1, rows, D, generator=g).to(dtype)
    with torch.no_grad(), _Ops() as ops:
        got = layer(x)
    assert "mixtral_lite::int8_linear" in ops.names and got.shape == (1, rows, 72) and got.dtype == dtype
    want = linear_int8_reference(x.float(), layer.weight, layer.scale)
    err = (got.float() - want).abs()
    # one rounding of the result, plus float32 accumulation in another order (D terms)
    magnitude = x.float().abs() @ dequantize(layer.weight, layer.scale).abs().T
    assert (err <= 2 * UNIT[dtype] * want.abs() + D * 2.0**-24 * magnitude).all(), err.max()


def _compile(kernel: str, dtype: str, arch: int):
    """Ahead-of-time compile one kernel to a cubin for CUDA ``arch`` (no GPU needed: Triton's own
    ptxas), with the constants its launcher passes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mixtral_lite.cuda import triton_moe as k

    dot = {"bf16": triton.language.bfloat16, "fp16": triton.language.float16, "fp32": triton.language.float32}[dtype]
    precision = "ieee" if dtype == "fp32" else "tf32"
    fn, pointers, ints, consts = {
        "gate_up": (
            k._gate_up_kernel,
            [dtype, "i8", dtype, "i8", dtype, "i64", dtype],
            ["P", "D", "F"],
            {"K": 2, "BLOCK_P": 16, "BLOCK_F": k.GATE_UP_TILE, "BLOCK_D": k.REDUCE_TILE},
        ),
        "down": (
            k._down_kernel,
            [dtype, "i8", dtype, "i64", "fp32"],
            ["P", "D", "F"],
            {"BLOCK_P": 16, "BLOCK_D": k.DOWN_TILE, "BLOCK_F": k.REDUCE_TILE},
        ),
        "linear": (
            k._linear_kernel,
            [dtype, "i8", dtype, dtype],
            ["M", "N_OUT", "N_IN"],
            {"BLOCK_M": 16, "BLOCK_O": k.LINEAR_TILE, "BLOCK_I": k.REDUCE_TILE},
        ),
    }[kernel]
    names = fn.arg_names
    consts = {**consts, "DOT": dot, "PRECISION": precision}
    signature = dict(zip(names, ["*" + p for p in pointers] + ["i32"] * len(ints), strict=False))
    signature.update({c: "constexpr" for c in consts})
    assert list(signature) == names, (list(signature), names)
    source = ASTSource(fn, signature, constexprs=consts)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": k.FP_FUSION})


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kernel", ["gate_up", "down", "linear"])
def test_kernels_compile_for_hopper(kernel: str, dtype: str) -> None:
    """The interpreter accepts code the compiler would not: every kernel, as its launcher
    configures it, compiles to a cubin for sm90 (H100/H200) with Triton's own ptxas; bf16 and fp16
    products go to the tensor cores (float32 ones stay exact: no tf32)."""
    compiled = _compile(kernel, dtype, 90)
    assert len(compiled.asm["cubin"]) > 0
    assert ("mma" in compiled.asm["ptx"]) == (dtype != "fp32")


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 100])
@pytest.mark.parametrize("kernel", ["gate_up", "down", "linear"])
def test_kernels_compile_for_ampere_and_blackwell(kernel: str, arch: int) -> None:
    assert len(_compile(kernel, "bf16", arch).asm["cubin"]) > 0


def test_ops_pass_torch_library_opcheck() -> None:
    """The fake (meta) implementations the traces and ``torch.compile`` use agree with what the
    kernels return (shapes, dtypes, strides), and the schemas hold (``torch.library.opcheck``)."""
    from mixtral_lite.cuda.ops import int8_linear, int8_moe_down, int8_moe_gate_up

    moe = int8_moe(torch.bfloat16)
    idx = torch.tensor(ROUTINGS["rows share experts, two never chosen"])
    x = torch.randn(idx.shape[0], D).to(torch.bfloat16)
    h = int8_moe_gate_up(x, moe.w1, moe.w1_scale, moe.w3, moe.w3_scale, idx)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(int8_moe_gate_up, (x, moe.w1, moe.w1_scale, moe.w3, moe.w3_scale, idx), test_utils=checks)
    torch.library.opcheck(int8_moe_down, (h, moe.w2, moe.w2_scale, idx), test_utils=checks)
    torch.library.opcheck(int8_linear, (x, moe.w1[0], moe.w1_scale[0]), test_utils=checks)


def test_launchers_refuse_shapes_that_do_not_fit() -> None:
    """The kernels index with the shapes they are given: a mismatch is an error, not a wrong read."""
    from mixtral_lite.cuda.triton_moe import down, gate_up, linear

    moe = int8_moe(torch.float32)
    idx = torch.tensor([[0, 1]])
    x = torch.randn(1, D)
    with pytest.raises(ValueError, match=r"int8 linear: shapes x \[1, 160\], q \[160, 200\], scale \[160\] do not fit"):
        linear(x, moe.w2[0], moe.w2_scale[0], interpret=True)
    with pytest.raises(ValueError, match="int8 MoE gate/up"):
        gate_up(x[:, :-1], moe.w1, moe.w1_scale, moe.w3, moe.w3_scale, idx, interpret=True)
    with pytest.raises(ValueError, match="int8 MoE down"):
        down(torch.randn(3, F), moe.w2, moe.w2_scale, idx, interpret=True)
    with pytest.raises(ValueError, match="contiguous"):
        linear(x, moe.w1[0].t().contiguous().t(), moe.w1_scale[0], interpret=True)
