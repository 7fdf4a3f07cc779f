"""The compiled few-row kernel (``native.py``, ``csrc/``) equals the plain products, the
model takes it exactly where intended, and without it everything still runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixtral_lite.cpu import build, native, products
from mixtral_lite.cpu.layout import is_column_major
from mixtral_lite.model import experts as moe
from mixtral_lite.model import quant
from mixtral_lite.model.experts import StackedExperts
from mixtral_lite.model.routing import route_topk

pytestmark = pytest.mark.skipif(not build.available(), reason="native kernel unavailable here")
ROOT = Path(__file__).resolve().parents[1]


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _bf16_close(y: torch.Tensor, ref64: torch.Tensor) -> None:
    """y (bfloat16) is the float64 reference rounded to bfloat16, give or take one unit in the last
    place (the float32 sums run in another order than the reference's)."""
    ulp = ref64.abs().clamp(min=1e-30) * 2.0**-7
    assert ((y.double() - ref64).abs() <= ulp + 1e-6).all(), (y.double() - ref64).abs().max()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8])
@pytest.mark.parametrize("out_in", [(96, 64), (33, 100), (5, 37), (300, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_linear_equals_linear(rows: int, out_in: tuple[int, int], dtype: torch.dtype) -> None:
    o, i = out_in
    x, w = _rand(rows, i, dtype=dtype), _rand(o, i, seed=1, dtype=dtype)
    assert native.use_native(x, w) == (dtype == torch.bfloat16 or rows <= native.FLOAT32_MAX_ROWS)
    y = native.native_linear(x, w)
    assert y.shape == (rows, o) and y.dtype == dtype
    ref = F.linear(x.double(), w.double())
    if dtype == torch.float32:  # float32 sums of i terms of size ~1: errors grow with i
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-7 * i)
    else:
        _bf16_close(y, ref)


@pytest.mark.parametrize("out_in", [(96, 64), (33, 100), (300, 1000), (40, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_equals_the_same_row_among_two_bit_for_bit(out_in: tuple[int, int], dtype: torch.dtype) -> None:
    """One activation row takes its own loop (with AVX-512 BF16: sums of 16 outputs, then one vector
    epilogue); each output's sum is still the one the two-row loop computes (the same operations in
    the same order), so the bits are equal, tails (outputs past a multiple of 16, inputs past one
    of 32) included."""
    o, i = out_in
    x, w = _rand(2, i, dtype=dtype), _rand(o, i, seed=1, dtype=dtype)
    two = native.native_linear(x, w)
    assert torch.equal(native.native_linear(x[:1], w), two[:1])
    assert torch.equal(native.native_linear(x[1:], w), two[1:])


def test_native_linear_shapes_and_views() -> None:
    """3-D activations, a weight that is a view into a stacked tensor (an expert), 1 and 2 threads:
    the same numbers (each output's sum does not depend on how the outputs are split)."""
    stack = _rand(4, 48, 80, seed=1, dtype=torch.bfloat16)
    x = _rand(2, 3, 80, dtype=torch.bfloat16)
    y = native.native_linear(x, stack[2])
    assert y.shape == (2, 3, 48)
    _bf16_close(y, F.linear(x.double(), stack[2].double()))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.native_linear(x, stack[2])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, y)


def test_bfloat16_rounding_and_specials() -> None:
    """Sums exactly halfway between two bfloat16 values round to the even one, like PyTorch's cast;
    inf and NaN pass through."""
    w = torch.ones(1, 2, dtype=torch.bfloat16)
    cases = [(1.0, 2.0**-8), (1.0 + 2.0**-7, 2.0**-8), (-3.0, -(2.0**-7)), (float("inf"), 1.0), (float("nan"), 1.0)]
    for a, b in cases:
        y = native.native_linear(torch.tensor([[a, b]], dtype=torch.bfloat16), w)
        expected = torch.tensor([a + b], dtype=torch.float32).to(torch.bfloat16)
        assert torch.equal(y[0], expected) or (torch.isnan(y).all() and torch.isnan(expected).all()), (a, b, y)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_int8_equals_reference(rows: int, dtype: torch.dtype) -> None:
    w = _rand(70, 129, seed=1)
    q, scale = quant.quantize_per_channel(w, dtype)
    x = _rand(rows, 129, dtype=dtype)
    assert native.use_native_int8(x, q, scale)
    y = native.native_int8(x, q, scale)
    _int8_close(y, x, q, scale)
    torch.testing.assert_close(products.linear_int8(x, q, scale), y, rtol=0, atol=0)  # the CPU entry point


def _int8_close(y: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """y is the dequantised product in float64, give or take float32 sums (float32: relative to the
    sum of the terms' magnitudes) or one unit in the
    last place (bfloat16), plus, where the kernel rounds activations to int16 (AVX512-VNNI), at most
    half a step of that grid per element: max|x_m| / 65534 * sum_k |q[o, k]| * scale[o]."""
    ref = F.linear(x.double(), quant.dequantize(q, scale).double())
    slack = torch.zeros_like(ref)
    if build.load().few_rows_vnni():
        step = x.double().abs().amax(-1, keepdim=True) / 32767
        slack = step / 2 * (q.double().abs().sum(-1) * scale.double())
    err = (y.double() - ref).abs()
    if y.dtype == torch.float32:
        # float32 sums: relative to the sum of the terms' magnitudes (a large element dominates them)
        terms = F.linear(x.double().abs(), quant.dequantize(q, scale).double().abs())
        assert (err <= slack * 1.001 + 1e-5 * (terms + 1)).all(), (err - slack).max()
    else:
        assert (err <= slack * 1.001 + ref.abs() * 2.0**-7 + 1e-6).all(), (err - slack).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_int8_rounds_activations_within_the_bound(dtype: torch.dtype) -> None:
    """Rows with one large element (the int16 grid is coarsest there), long rows past the int32 chunk
    (8192), a zero row and rows with inf / NaN (those take the float32 loop and carry them)."""
    w = _rand(40, 9000, seed=1)
    q, scale = quant.quantize_per_channel(w, dtype)
    x = _rand(4, 9000, dtype=dtype)
    x[0, 5] = 300.0
    x[1] = 0
    _int8_close(native.native_int8(x, q, scale), x, q, scale)
    for special in (float("inf"), float("nan")):
        xs = x.clone()
        xs[2, 7] = special
        y = native.native_int8(xs, q, scale)
        expected = special * q[:, 7].double() * scale.double()  # inf * 0 is NaN; the finite terms do not matter
        torch.testing.assert_close(y[2].double(), expected.where(~expected.isfinite(), y[2].double()), equal_nan=True)
        _int8_close(y[[0, 1, 3]], x[[0, 1, 3]], q, scale)


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_swiglu_int8_equals_three_products(rows: int, dtype: torch.dtype) -> None:
    """The int8 expert in one call: the three int8 products of the plain code (each within
    ``_int8_close``), rounded in between as the model's ops round."""
    d, i = 96, 200
    ws = [_rand(*s, seed=k) * 0.2 for k, s in ((1, (i, d)), (2, (d, i)), (3, (i, d)))]
    (q1, s1), (q2, s2), (q3, s3) = (quant.quantize_per_channel(w, dtype) for w in ws)
    x = _rand(rows, d, dtype=dtype)
    qs, ss = (q1, q2, q3), (s1, s2, s3)
    assert native.use_native_swiglu_int8(x, qs, ss)
    y = native.native_swiglu_int8(x, qs, ss)
    h = F.silu(native.native_int8(x, q1, s1)) * native.native_int8(x, q3, s3)
    ref = native.native_int8(h, q2, s2)
    assert y.shape == ref.shape and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    assert ((y.double() - ref.double()).abs() <= 2 * tol * (ref.double().abs() + 1)).all()
    ref8 = quant.linear_int8_reference
    plain = ref8(F.silu(ref8(x, q1, s1)) * ref8(x, q3, s3), q2, s2).double()  # float32 products
    assert ((y.double() - plain).abs() <= 0.01 * plain.abs() + 0.003 * plain.abs().max()).all()


@pytest.mark.parametrize("rows", [1, 2, 3, 6, 8])
@pytest.mark.parametrize("dims", [(64, 96), (37, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_swiglu_equals_three_products(rows: int, dims: tuple[int, int], dtype: torch.dtype) -> None:
    """One call for a whole SwiGLU expert: the plain three-product code's result (float32: up to the
    order of the additions; bfloat16: rounding where PyTorch's ops round, so within an ulp)."""
    d, i = dims
    x = _rand(rows, d, dtype=dtype)
    w1, w3, w2 = (_rand(*s, seed=k, dtype=dtype) * 0.2 for k, s in ((1, (i, d)), (2, (i, d)), (3, (d, i))))
    y = native.native_swiglu(x, w1.contiguous(), w2.contiguous(), w3.contiguous())
    ref = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)
    assert y.shape == ref.shape and y.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:
        ulp = ref.float().abs().clamp(min=2.0**-10) * 2.0**-7
        assert ((y.float() - ref.float()).abs() <= 2 * ulp).all(), (y.float() - ref.float()).abs().max()


class _FastExperts(StackedExperts):
    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return products.swiglu(x, self.w1[e], self.w2[e], self.w3[e])


def test_experts_use_the_fused_call(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = native.native_swiglu
    monkeypatch.setattr(products, "native_swiglu", lambda x, *w: calls.append(x.shape[0]) or real(x, *w))
    g = torch.Generator().manual_seed(0)
    e, d, i = 4, 32, 48
    w1, w3, w2 = torch.randn(e, i, d, generator=g), torch.randn(e, i, d, generator=g), torch.randn(e, d, i, generator=g)
    x = torch.randn(3, d, generator=g)
    idx, weights = route_topk(torch.randn(3, e, generator=g), 2)
    ref = moe.experts_reference(x, StackedExperts(w1, w2, w3), idx, weights)
    fast = _FastExperts(w1, w2, w3)  # CpuSparseMoE's per-expert product
    torch.testing.assert_close(moe.dispatch_experts(x, fast, idx, weights, "sorted"), ref, rtol=1e-4, atol=1e-4)
    assert calls and all(c <= native.FLOAT32_MAX_ROWS for c in calls)


@pytest.mark.parametrize("rows", [1, 3, 8, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rmsnorm_equals_the_module(rows: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """bfloat16: bit for bit the module's PyTorch ops (float32 norm, round, scale, round), many rows
    (prefill) too; float32: up to the order of the sum of squares, many rows left to PyTorch's one op."""
    from mixtral_lite.model.mixtral import RMSNorm

    norm = RMSNorm(100, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_rand(100, seed=1) * 0.5 + 1)
    x = _rand(rows, 100, seed=2).to(dtype) * 3
    assert not native.use_native_rmsnorm(x, norm.weight)  # autograd on the weight: PyTorch's ops
    with torch.no_grad():
        many = _rand(9, 100).to(dtype)
        assert native.use_native_rmsnorm(many, norm.weight) == (dtype == torch.bfloat16)
        if rows > native.NATIVE_MAX_ROWS and dtype == torch.float32:
            return
        assert native.use_native_rmsnorm(x, norm.weight)
        y = native.native_rmsnorm(x, norm.weight, norm.eps)
        ref = norm(x)  # the reference module
    if dtype == torch.bfloat16:
        assert torch.equal(y, ref)
    else:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)


def test_use_native_rules() -> None:
    w = _rand(40, 16)
    rows = native.NATIVE_MAX_ROWS
    assert native.use_native(_rand(rows, 16).bfloat16(), w.bfloat16())
    assert native.use_native(_rand(1, 1, 16), w)
    assert not native.use_native(_rand(rows + 1, 16).bfloat16(), w.bfloat16())  # many rows: oneDNN / BLAS
    assert native.use_native(_rand(native.FLOAT32_MAX_ROWS, 16), w)
    assert not native.use_native(_rand(native.FLOAT32_MAX_ROWS + 1, 16), w)
    assert not native.use_native(_rand(1, 16).bfloat16(), w)  # mixed dtypes
    assert not native.use_native(_rand(1, 16).half(), w.half())  # float16: PyTorch's kernels
    assert not native.use_native(_rand(1, 16), w.t().contiguous().t())  # column-major weight
    assert not native.use_native(_rand(1, 16), w.clone().requires_grad_())  # autograd: F.linear
    q, scale = quant.quantize_per_channel(w, torch.bfloat16)
    assert native.use_native_int8(_rand(1, 16).bfloat16(), q, scale)
    assert not native.use_native_int8(_rand(1, 16), q, scale)  # scale dtype differs from x's
    assert not native.use_native_int8(_rand(rows + 1, 16).bfloat16(), q, scale)


def test_linear_takes_native_and_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []

    def spy(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return native.native_linear(x, w)

    monkeypatch.setattr(products, "native_linear", spy)
    w = _rand(40, 64, seed=1)
    x = _rand(1, 64)
    torch.testing.assert_close(products.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert calls == [(1, 64)]
    products.linear(_rand(32, 64), w)  # many rows: not the kernel
    assert len(calls) == 1


def test_float32_weights_stay_row_major_with_the_kernel() -> None:
    from mixtral_lite import Mixtral, MixtralConfig
    from mixtral_lite.cpu import install_cpu_kernels

    model = Mixtral(MixtralConfig.from_preset("tiny"))
    install_cpu_kernels(model)
    assert not any(is_column_major(p) for p in model.parameters())
    assert model.layers[0].feed_forward.w1.is_contiguous()


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=ROOT, timeout=300)


def test_switched_off_and_unbuildable_fall_back(tmp_path: Path) -> None:
    """``MIXTRAL_LITE_NATIVE=0`` or a compiler that fails: the status says why, products still run
    (PyTorch's kernels) and float32 weights go back to the column-major layout."""
    code = (
        "import torch, torch.nn.functional as F\n"
        "from mixtral_lite.cpu import build, layout, native, products\n"
        "print(build.status())\n"
        "x, w = torch.randn(1, 64), torch.randn(40, 64)\n"
        "assert not native.use_native(x, w)\n"
        "torch.testing.assert_close(products.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)\n"
        "from mixtral_lite import Mixtral, MixtralConfig, install_cpu_kernels\n"
        "net = Mixtral(MixtralConfig.from_preset('tiny'))\n"
        "print(install_cpu_kernels(net))\n"
        "assert layout.is_column_major(net.layers[0].attention.wq.weight)\n"
    )
    off = _python(code, MIXTRAL_LITE_NATIVE="0")
    assert off.returncode == 0, off.stderr
    assert off.stdout.startswith("off (MIXTRAL_LITE_NATIVE=0)")
    broken = _python(code, CC="false", MIXTRAL_LITE_CACHE=str(tmp_path))
    assert broken.returncode == 0, broken.stderr
    assert broken.stdout.startswith("off (") and "failed" in broken.stdout
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-built left to load


def test_builds_into_the_cache(tmp_path: Path) -> None:
    code = "from mixtral_lite.cpu import build\nprint(build.status())\n"
    done = _python(code, MIXTRAL_LITE_CACHE=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("on (") and str(tmp_path) in done.stdout
    assert len(list((tmp_path / "native").glob("few_rows-*.so"))) == 1


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86-64 -march names")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"])
def test_portable_builds_compute_the_same(tmp_path: Path, arch: str) -> None:
    """The kernel built for AVX2 (no AVX-512, no bfloat16 pairs) and for plain x86-64 (generic
    vectors) gives the same products: the loops other CPUs take, checked on this one."""
    code = (
        "import torch, torch.nn.functional as F\n"
        "from mixtral_lite.cpu import build, native\n"
        "from mixtral_lite.model import quant\n"
        "assert build.status().startswith('on'), build.status()\n"
        "assert build.load().few_rows_dpbf16() == 0 and build.load().few_rows_vnni() == 0\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for rows in (1, 2, 5, 8):\n"
        "        x, w = torch.randn(rows, 100, generator=g).to(dtype), torch.randn(70, 100, generator=g).to(dtype)\n"
        "        ref = F.linear(x.double(), w.double())\n"
        "        tol = 1e-5 if dtype == torch.float32 else 2.0**-7\n"
        "        assert ((native.native_linear(x, w).double() - ref).abs() <= tol * (ref.abs() + 1)).all()\n"
        "        q, s = quant.quantize_per_channel(w.float(), dtype)\n"
        "        ref8 = F.linear(x.double(), quant.dequantize(q, s).double())\n"
        "        assert ((native.native_int8(x, q, s).double() - ref8).abs() <= tol * (ref8.abs() + 1)).all()\n"
        "        a, b, c = (torch.randn(*s, generator=g).to(dtype) / 5 for s in ((96, 100), (96, 100), (100, 96)))\n"
        "        r3 = F.linear(F.silu(F.linear(x, a)) * F.linear(x, b), c).double()\n"
        "        assert ((native.native_swiglu(x, a, c, b).double() - r3).abs() <= 2 * tol * (r3.abs() + 1)).all()\n"
        "        nw = torch.rand(100, generator=g).to(dtype) + 0.5\n"
        "        rn = (nw.double() * x.double() * (x.double().pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt())\n"
        "        assert ((native.native_rmsnorm(x, nw, 1e-5).double() - rn).abs() <= 2 * tol * (rn.abs() + 1)).all()\n"
        "        q = torch.randn(2, 5, 4, 16, generator=g).to(dtype).transpose(1, 2)\n"
        "        k, m = torch.randn(2, 2, 30, 16).to(dtype), torch.zeros(2, 1, 5, 30, dtype=dtype)\n"
        "        qd, kd = q.double(), k.double()\n"
        "        ra = F.scaled_dot_product_attention(qd, kd, kd, attn_mask=m.double(), enable_gqa=True)\n"
        "        assert ((native.native_attention(q, k, k, m).double() - ra).abs() <= tol * (ra.abs() + 1)).all()\n"
        "        ws = tuple(t.expand(3, -1, -1).contiguous() for t in (a, c, b))\n"
        "        idx = torch.tensor([[0, 2]] * rows)\n"
        "        ye = native.native_experts(x, ws, None, idx, torch.full((rows, 2), 0.5))\n"
        "        assert ((ye.double() - r3).abs() <= 2 * tol * (r3.abs() + 1)).all()\n"
        "from mixtral_lite.model.routing import route_topk\n"
        "from mixtral_lite.cpu.layer import native_route\n"
        "logits = torch.randint(0, 3, (500, 8), generator=g).float()\n"
        "assert torch.equal(native_route(logits, 2)[0], route_topk(logits, 2)[0])\n"
        "q, k = torch.randn(1, 4, 40, 32, generator=g), torch.randn(1, 2, 40, 32, generator=g)\n"
        "ra = F.scaled_dot_product_attention(q.double(), k.double(), k.double(), is_causal=True, enable_gqa=True)\n"
        "assert ((native.native_prefill_attention(q, k, k, None).double() - ra).abs() < 1e-5).all()\n"
        "from mixtral_lite import KVCache, Mixtral, MixtralConfig, install_cpu_kernels, uninstall_cpu_kernels\n"
        "cfg = MixtralConfig.from_preset('tiny')\n"
        "torch.manual_seed(0)\n"
        "net = Mixtral(cfg).bfloat16().eval()\n"
        "install_cpu_kernels(net)\n"
        "def step():\n"
        "    cache = KVCache(cfg, 2, 8, dtype=torch.bfloat16)\n"
        "    net(torch.tensor([[3, 4], [5, 6]]), cache=cache, slots=torch.arange(2))\n"
        "    return net(torch.tensor([[7], [8]]), cache=cache, slots=torch.tensor([2]))\n"
        "with torch.no_grad():\n"
        "    one = step()\n"
        "    assert net.layers[0]._layer_plan.ok\n"
        "    uninstall_cpu_kernels(net)\n"
        "    plain = step()\n"
        "assert (one.float() - plain.float()).abs().max() < 0.02, (one.float() - plain.float()).abs().max()\n"
        "print('ok')\n"
    )
    done = _python(code, MIXTRAL_LITE_CACHE=str(tmp_path), MIXTRAL_LITE_MARCH=arch)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
    assert len(list((tmp_path / "native").glob(f"few_rows-{arch}-*.so"))) == 1
