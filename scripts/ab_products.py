"""Interleaved A/B of two versions of the C kernel on one-row products (or whole decode steps of a
model, ``--decode``), in one process.

Each source tree (a ``mixtral_lite/cpu/csrc`` folder, e.g. of another worktree) is compiled with the
kernel's own flags into a temporary library; both are loaded and called in turns on the same weights
(enough distinct copies that every call reads from memory), so a drifting load falls on both alike.
Prints the median microseconds and GB/s of each, and B's speed-up.

    python scripts/ab_products.py /work/main/mixtral_lite/cpu/csrc mixtral_lite/cpu/csrc
    python scripts/ab_products.py A B --shape 14336x4096 --dtype bfloat16 --rounds 9
    python scripts/ab_products.py A B --decode bench_out/vs_llamacpp/ckpt-bench --dtype bfloat16

``--decode``: the model is loaded once and its greedy decoding (batch 1) timed in turns with
library A and library B in place of the kernel (``cpu.build``'s loaded library is swapped between
runs); the tokens must agree.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mixtral_lite.cpu import build, hugepages  # noqa: E402

WTYPES = {"float32": 0, "bfloat16": 1}


def compile_tree(csrc: Path, out: Path) -> ctypes.CDLL:
    sources = [str(csrc / f.name) for f in build.SOURCES]
    cc = build._compiler()
    subprocess.run([cc, *build._flags(), *sources, "-o", str(out), "-lm"], check=True)
    lib = ctypes.CDLL(str(out))
    lib.few_rows.restype = ctypes.c_int
    lib.few_rows.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
    lib.few_rows.argtypes += [ctypes.c_int] * 2
    return lib


def load_tree(csrc: Path) -> ctypes.CDLL:
    """``build.load()`` of the sources in ``csrc`` (its own cache entry, every entry's argument types)."""
    saved = build.CSRC, build.SOURCES
    build.CSRC, build.SOURCES = csrc, tuple(csrc / f.name for f in saved[1])
    build._lib, build._status = None, None
    try:
        lib = build.loaded()
    finally:
        build.CSRC, build.SOURCES = saved
    return lib


def decode_ab(args: argparse.Namespace) -> int:
    from mixtral_lite.bench.engines import Ours

    libs = {"A": load_tree(args.a), "B": load_tree(args.b)}
    dtype = getattr(torch, (args.dtype or ["bfloat16"])[0])
    engine = Ours.load(args.decode, dtype, torch.device("cpu"))
    one = torch.tensor([[5]])
    speeds: dict[str, list[float]] = {"A": [], "B": []}
    tokens = {}
    for r in range(args.rounds + 1):  # round 0: warm-up
        for k in ("A", "B") if r % 2 else ("B", "A"):
            build._lib = libs[k]
            run = engine.greedy(one, args.tokens + 1)
            tokens[k] = run.tokens
            if r:
                speeds[k].append(run.decode_tokens_per_s)
    if tokens["A"] != tokens["B"]:
        print("tokens differ between A and B")
        return 1
    ratios = [b / a for a, b in zip(speeds["A"], speeds["B"], strict=True)]
    a, b = (statistics.median(speeds[k]) for k in ("A", "B"))
    print(f"A = {args.a}\nB = {args.b}\n{args.decode} {dtype}, {args.threads} threads, {args.rounds} rounds")
    print(f"decode b1: A {a:.1f} tok/s, B {b:.1f} tok/s; B / A per round: median {statistics.median(ratios):.2f}")
    print(f"  [{min(ratios):.2f}-{max(ratios):.2f}]")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--shape", action="append", help="OxI (default: the bench preset's and 8x7B's products)")
    p.add_argument("--dtype", action="append", choices=list(WTYPES))
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--decode", type=Path, default=None, help="a model folder: A/B of its greedy decoding")
    p.add_argument("--tokens", type=int, default=64, help="--decode: tokens per run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.decode is not None:
        return decode_ab(args)
    shapes = args.shape or ["1792x512", "512x1792", "32000x512", "14336x4096", "4096x14336"]
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"A": compile_tree(args.a, Path(tmp) / "a.so"), "B": compile_tree(args.b, Path(tmp) / "b.so")}
        print(f"A = {args.a}\nB = {args.b}\n{args.rows} row(s), {args.threads} threads, {args.rounds} rounds\n")
        print("| product | dtype | A us | B us | A GB/s | B GB/s | B / A speed |")
        print("|---|---|---|---|---|---|---|")
        for shape in shapes:
            o, i = map(int, shape.split("x"))
            for dt in args.dtype or list(WTYPES):
                dtype = getattr(torch, dt)
                nbytes = o * i * dtype.itemsize
                ws = [torch.randn(o, i).to(dtype) for _ in range(max(2, (256 << 20) // nbytes + 1))]
                if hugepages.available():  # where a loaded model's weights live (cpu.install)
                    ws = [hugepages.huge_page_copy(w) for w in ws]
                x = torch.randn(args.rows, i).to(dtype)
                ys = {k: torch.empty(args.rows, o, dtype=dtype) for k in libs}
                times: dict[str, list[float]] = {k: [] for k in libs}
                for r in range(args.rounds + 1):  # round 0: warm-up
                    for k in ("A", "B") if r % 2 else ("B", "A"):
                        fn, y = libs[k].few_rows, ys[k]
                        t0 = time.perf_counter()
                        for w in ws:
                            fn(w.data_ptr(), WTYPES[dt], None, x.data_ptr(), y.data_ptr(), args.rows, o, i,
                               WTYPES[dt], args.threads)  # fmt: skip
                        if r:
                            times[k].append((time.perf_counter() - t0) / len(ws))
                if not torch.equal(ys["A"], ys["B"]):
                    diff = (ys["A"].float() - ys["B"].float()).abs().max().item()
                    print(f"  note: {shape} {dt}: outputs differ by up to {diff:.3g}")
                ta, tb = (statistics.median(times[k]) for k in ("A", "B"))
                print(
                    f"| {shape} | {dt} | {ta * 1e6:.0f} | {tb * 1e6:.0f} | {nbytes / ta / 1e9:.1f} | "
                    f"{nbytes / tb / 1e9:.1f} | {ta / tb:.2f}x |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
