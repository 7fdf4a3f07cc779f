"""Building and loading the C kernel (``csrc/``): compiled once per CPU, loaded with ``ctypes``.

The kernel is compiled with the system C compiler (``cc -O3 -march=native -fopenmp``;
``$MIXTRAL_LITE_MARCH`` replaces ``native``) into ``$MIXTRAL_LITE_CACHE`` (default
``~/.cache/mixtral_lite``), keyed by the sources, the flags, the compiler and the CPU's features.
Without a compiler, or with ``MIXTRAL_LITE_NATIVE=0``, ``load()`` returns None and ``status()``
says why; the rest of the backend then runs on PyTorch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(
    CSRC / f for f in ("products.c", "decode.c", "layer.c", "attention.c", "int4.c", "convert.c")
)  # all include kernel.h
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]


def march() -> str:
    """The ``-march`` the kernel is built for: ``native`` (this CPU), or ``$MIXTRAL_LITE_MARCH``
    (e.g. ``x86-64-v3`` for AVX2 machines sharing one cache directory)."""
    return os.environ.get("MIXTRAL_LITE_MARCH") or "native"


def _flags() -> list[str]:
    return [*FLAGS, f"-march={march()}"]


_lib: ctypes.CDLL | None = None
_status: str | None = None  # None: not tried yet


def cache_dir() -> Path:
    return Path(os.environ.get("MIXTRAL_LITE_CACHE") or Path.home() / ".cache" / "mixtral_lite")


def _cpu_key() -> str:
    """What the compiled code depends on: the source, the flags, the compiler and the CPU's features
    (``-march=native``: a library built on another CPU may use instructions this one lacks)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    h = hashlib.sha256()
    sources = [f.read_bytes() for f in (*SOURCES, CSRC / "kernel.h")]
    for part in (*sources, " ".join(_flags()).encode(), platform.machine().encode(), flags.encode()):
        h.update(part)
    h.update(_compiler_version().encode())
    return h.hexdigest()[:16]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _compiler_version() -> str:
    cc = _compiler()
    if cc is None:
        return ""
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _build(target: Path) -> None:
    """Compile the kernel into ``target`` (atomically: a half-written library is never loaded)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, *_flags(), *map(str, SOURCES), "-o", str(out), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed on {', '.join(f.name for f in SOURCES)}: {done.stderr.strip()[-500:]}")
        os.replace(out, target)
    for old in target.parent.glob(f"few_rows-{march()}-*.so"):  # builds of older sources
        if old != target:
            old.unlink(missing_ok=True)


def load() -> ctypes.CDLL | None:
    """The compiled kernel (building it on first use), or None when it cannot be had here."""
    global _lib, _status
    if _status is not None:
        return _lib
    if os.environ.get("MIXTRAL_LITE_NATIVE", "1") == "0":
        _status = "off (MIXTRAL_LITE_NATIVE=0)"
        return None
    if platform.system() != "Linux":
        _status = f"off (built on Linux only, this is {platform.system()})"
        return None
    try:
        target = cache_dir() / "native" / f"few_rows-{march()}-{_cpu_key()}.so"
        if not target.exists():
            print(
                f"mixtral_lite: building the CPU kernel into {target.parent} (once per CPU and version)",
                file=sys.stderr,
            )
            _build(target)
        lib = ctypes.CDLL(str(target))
        fn = lib.few_rows
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_int] * 2
        sw = lib.few_rows_swiglu
        sw.restype = ctypes.c_int
        ptrs = [ctypes.c_void_p] * 6  # w1 w3 w2 and their scales (int8)
        sw.argtypes = ptrs + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 3 + [ctypes.c_int] * 2
        ex = lib.few_rows_experts
        ex.restype = ctypes.c_int
        ex.argtypes = ptrs + [ctypes.c_void_p] * 3  # int4 offsets
        ex.argtypes += [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
        ex.argtypes += [ctypes.c_void_p]  # residual
        ex.argtypes += [ctypes.c_void_p] * 2 + [ctypes.c_long] * 3 + [ctypes.c_int] * 2
        qkv = lib.few_rows_qkv
        qkv.restype = ctypes.c_int
        qkv.argtypes = ptrs + [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 4
        qkv.argtypes += [ctypes.c_long] * 4 + [ctypes.c_int] * 2
        ng = lib.few_rows_norm_gate
        ng.restype = ctypes.c_int
        ng.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_float] + [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3
        ng.argtypes += [ctypes.c_int] * 2
        blk = lib.few_rows_attention_block
        blk.restype = ctypes.c_int
        blk.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_float] + [ctypes.c_void_p] * 12 + [ctypes.c_int, ctypes.c_long]
        blk.argtypes += [ctypes.c_void_p] * 7 + [ctypes.c_long] * 7 + [ctypes.c_int] * 2
        at = lib.few_rows_attention
        at.restype = ctypes.c_int
        at.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 4 + [ctypes.c_long] * 6
        at.argtypes += [ctypes.c_float, ctypes.c_int, ctypes.c_int]
        rn = lib.few_rows_rmsnorm
        rn.restype = None
        rn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float, ctypes.c_int]
        lib.many_rows_attention.restype = ctypes.c_int
        lib.many_rows_attention.argtypes = at.argtypes  # the same arguments as few_rows_attention
        lib.many_rows_rmsnorm.restype = None
        lib.many_rows_rmsnorm.argtypes = rn.argtypes + [ctypes.c_int]
        mk = lib.few_rows_mask
        mk.restype = None
        mk.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        mk.argtypes += [ctypes.c_int]
        ro = lib.few_rows_route
        ro.restype = ctypes.c_int
        ro.argtypes = [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 2
        i4 = lib.few_rows_int4
        i4.restype = ctypes.c_int
        i4.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 4 + [ctypes.c_int] * 2
        e4 = lib.few_rows_experts_int4
        e4.restype = ctypes.c_int
        e4.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
        e4.argtypes += [ctypes.c_void_p] * 2 + [ctypes.c_long] * 4 + [ctypes.c_int] * 2
        lib.convert_int8.restype = ctypes.c_int
        lib.convert_int8.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] + [ctypes.c_int] * 2
        lib.convert_int4.restype = ctypes.c_int
        lib.convert_int4.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int] * 2
        ly = lib.few_rows_layer  # its first argument: a ctypes.byref of native_layer's struct
        ly.restype = ctypes.c_int
        ly.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_long] * 3 + [ctypes.c_int]
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _status = f"off ({e})"
        print(
            f"mixtral_lite: warning: the CPU kernel is unavailable ({str(e)[:200]}); CPU decoding runs on PyTorch's "
            "kernels, several times slower. Install a C compiler (cc) for it, or set MIXTRAL_LITE_NATIVE=0 to "
            "choose PyTorch's kernels without this warning",
            file=sys.stderr,
        )
        return None
    _lib, _status = lib, f"on ({target})"
    return _lib


def available() -> bool:
    """Whether the kernel is built and loaded (building it on first use)."""
    return load() is not None


def status() -> str:
    """``on (path of the library)`` or ``off (why)``; builds the kernel if not tried yet."""
    load()
    assert _status is not None
    return _status


def loaded() -> ctypes.CDLL:
    """The kernel, which the caller knows is available."""
    lib = load()
    if lib is None:
        raise RuntimeError(f"native kernel unavailable: {status()}")
    return lib


__all__ = ["available", "cache_dir", "load", "loaded", "march", "status"]
