"""llama.cpp, the CPU implementation users pick, as a second engine for ``scripts/vs_llamacpp.py``:
built from the source the ``llama-cpp-python`` sdist vendors, fed the same checkpoint through its
own converter (``convert_hf_to_gguf.py``, ``llama-quantize``), timed by its own ``llama-bench``,
and asked for greedy tokens and log-probabilities through ``llama-server`` (token ids in, token
ids out: no tokenizer on either side).

Nothing here is imported by the model or the CPU backend; everything runs llama.cpp's programs as
subprocesses, and every failure names the program, the file and the program's last words.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

SDIST_VERSION = "0.3.36"  # llama-cpp-python, whose sdist vendors llama.cpp
DEFAULT_HOME = Path.home() / ".cache" / "llamacpp-anchor"  # the same place as the shared build tool
TARGETS = ("llama-bench", "llama-quantize", "llama-server")
# convert_hf_to_gguf.py --outtype, and the llama-quantize types made from the bf16 file
CONVERTED = ("f32", "bf16", "q8_0")
QUANTIZED = {"q4_0": "Q4_0", "q4_K_M": "Q4_K_M"}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((x for x in text.splitlines() if x.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cmake_cpu_flags(amx: bool = False) -> list[str]:
    """``-DGGML_NATIVE=ON`` (``-march=native``), except on an x86 CPU that advertises AMX when
    ``amx`` is False: there ``-march=native -mno-amx-*`` is passed by hand (ggml's own native flag
    comes after any flags given, so it cannot be amended), the same build less the AMX kernels.
    The vendored llama.cpp's AMX matrix products (q8_0, q4_0) die with a general protection fault
    in ``ldtilecfg`` on such a machine, whose AMX otherwise runs (docs/performance.md)."""
    if amx or "amx_tile" not in _cpu_flags():
        return ["-DGGML_NATIVE=ON"]
    march = "-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    return ["-DGGML_NATIVE=OFF", "-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_BMI2=OFF", "-DGGML_FMA=OFF",
            "-DGGML_F16C=OFF", f"-DCMAKE_C_FLAGS={march}", f"-DCMAKE_CXX_FLAGS={march}"]  # fmt: skip


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _run(cmd: list[str], what: str, *, cwd: Path | None = None, timeout: float | None = None) -> str:
    """Run one program to the end; its stdout, or a RuntimeError with its last lines."""
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{what}: {' '.join(cmd[:3])} ...: {e}") from e
    if done.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{_tail(done.stderr + done.stdout)}"
        )
    return done.stdout


@dataclass
class LlamaCpp:
    """One llama.cpp build: ``home/src`` (the sources, with the converter), ``home/build/bin``."""

    home: Path = DEFAULT_HOME

    @property
    def src(self) -> Path:
        return self.home / "src"

    @property
    def bin(self) -> Path:
        return self.home / "build" / "bin"

    def tool(self, name: str) -> Path:
        return self.bin / name

    def built(self) -> bool:
        """The timing and conversion tools and the converter are there (the server may still be building)."""
        tools = ("llama-bench", "llama-quantize")
        return all(self.tool(t).is_file() for t in tools) and (self.src / "convert_hf_to_gguf.py").is_file()

    def has_server(self) -> bool:
        return self.tool("llama-server").is_file()

    def version(self) -> str:
        out = subprocess.run([str(self.tool("llama-server")), "--version"], capture_output=True, text=True)
        lines = (out.stdout + out.stderr).strip().splitlines()
        return next((line for line in lines if "version" in line), lines[-1] if lines else "unknown")

    def build(self, jobs: int = 2, version: str = SDIST_VERSION, *, amx: bool = False) -> None:
        """Download the sdist with pip, take its vendored llama.cpp, build the three programs with
        cmake (Release, this CPU's extensions, ``-j jobs``; see ``cmake_cpu_flags`` for ``amx``).
        Cached: does nothing when they are already built with the same flags; an interrupted build
        resumes where cmake left it."""
        flags = ["-DCMAKE_BUILD_TYPE=Release", *cmake_cpu_flags(amx), "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
        flags += ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_EXAMPLES=ON"]
        stamp = self.home / "build" / "mixtral_lite-cmake-flags.txt"
        # a build without the stamp (an older one, the shared build tool's) is a native one
        done = stamp.read_text() if stamp.is_file() else None
        native = cmake_cpu_flags(amx) == ["-DGGML_NATIVE=ON"]
        if self.built() and self.has_server() and (done == " ".join(flags) or done is None and native):
            return
        for prog in ("cmake", "c++"):
            if shutil.which(prog) is None:
                raise UserError(f"building llama.cpp needs {prog!r} on the PATH (apt-get install cmake g++)")
        self.home.mkdir(parents=True, exist_ok=True)
        if not (self.src / "CMakeLists.txt").is_file():
            with tempfile.TemporaryDirectory(dir=self.home) as tmp:
                pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
                _run([*pip, f"llama-cpp-python=={version}", "-d", tmp], "pip download of the llama-cpp-python sdist")
                archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
                with tarfile.open(archive) as tar:
                    tar.extractall(tmp, filter="data")
                vendored = Path(tmp) / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
                if not (vendored / "CMakeLists.txt").is_file():
                    raise RuntimeError(f"{archive.name}: no vendor/llama.cpp/CMakeLists.txt in the sdist")
                shutil.rmtree(self.src, ignore_errors=True)
                os.replace(vendored, self.src)
        build = self.home / "build"
        _run(["cmake", "-S", str(self.src), "-B", str(build), *flags], "cmake configure of llama.cpp")
        _run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TARGETS], "cmake build of llama.cpp")
        if not (self.built() and self.has_server()):
            raise RuntimeError(f"llama.cpp build finished but {self.bin} lacks one of {', '.join(TARGETS)}")
        stamp.write_text(" ".join(flags))

    def require(self) -> None:
        if not self.built():
            raise UserError(
                f"llama.cpp is not built in {self.home} (expected llama-bench, llama-quantize in {self.bin} and "
                f"convert_hf_to_gguf.py in {self.src}): pass --build, or --llamacpp DIR of an existing build"
            )

    # --- conversion ---------------------------------------------------------------------------

    def convert(self, hf_dir: Path, kind: str, out_dir: Path) -> Path:
        """``hf_dir`` as a GGUF file of ``kind`` (f32, bf16, q8_0 by the converter; q4_0, q4_K_M
        by llama-quantize from the bf16 file), reused while it is newer than the checkpoint's
        config; written under a temporary name and renamed, so a half-written file is never used."""
        out = out_dir / f"{kind}.gguf"
        stamp = (hf_dir / "config.json").stat().st_mtime
        if out.is_file() and out.stat().st_mtime >= stamp:
            return out
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        try:
            if kind in CONVERTED:
                script = self.src / "convert_hf_to_gguf.py"
                cmd = [sys.executable, str(script), str(hf_dir), "--outtype", kind, "--outfile", str(tmp)]
                _run(cmd, f"convert_hf_to_gguf.py --outtype {kind} of {hf_dir}")
            elif kind in QUANTIZED:
                source = self.convert(hf_dir, "bf16", out_dir)
                cmd = [str(self.tool("llama-quantize")), str(source), str(tmp), QUANTIZED[kind], "2"]
                _run(cmd, f"llama-quantize {QUANTIZED[kind]} of {source}")
            else:
                raise UserError(f"GGUF kind: expected one of {', '.join((*CONVERTED, *QUANTIZED))}, got {kind!r}")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return out

    # --- timing -------------------------------------------------------------------------------

    def bench(self, gguf: Path, *, prompt: int, gen: int, threads: int, reps: int) -> dict[str, float]:
        """llama-bench's prompt processing (pp) and generation (tg) speeds in tokens/s, the mean of
        ``reps`` repetitions after its own warm-up run (its default way of measuring)."""
        cmd = [str(self.tool("llama-bench")), "-m", str(gguf), "-p", str(prompt), "-n", str(gen)]
        cmd += ["-t", str(threads), "-r", str(reps), "-o", "json"]
        rows = json.loads(_run(cmd, f"llama-bench of {gguf.name}"))
        out = {}
        for row in rows:
            key = "prefill" if row["n_gen"] == 0 else "decode"
            out[key] = float(row["avg_ts"])
        if set(out) != {"prefill", "decode"}:
            raise RuntimeError(f"llama-bench of {gguf.name}: expected a pp and a tg row, got {rows}")
        return out

    # --- greedy tokens ------------------------------------------------------------------------

    @contextlib.contextmanager
    def server(self, gguf: Path, *, threads: int, context: int) -> Iterator[str]:
        """A llama-server on a free local port for the block; yields its base URL."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(self.tool("llama-server")), "-m", str(gguf), "-t", str(threads), "-c", str(context)]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "-np", "1", "--no-warmup"]
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"llama-server on {gguf.name} exited ({proc.returncode}):\n{_tail(log.read())}")
                with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                    with urllib.request.urlopen(url + "/health", timeout=5) as r:
                        if r.status == 200:
                            break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server on {gguf.name}: not ready after 600 s")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()

    def greedy(self, gguf: Path, prompt: list[int], n: int, *, threads: int) -> tuple[list[int], list[float]]:
        """n greedy tokens after ``prompt`` (token ids, no BOS added, EOS suppressed) and the
        log-probability llama.cpp gave each chosen token (softmax over its full logits)."""
        with self.server(gguf, threads=threads, context=len(prompt) + n + 8) as url:
            body = {
                "prompt": prompt,
                "n_predict": n,
                "temperature": 0.0,
                "top_k": 1,
                "ignore_eos": True,
                "cache_prompt": False,
                "return_tokens": True,
                "n_probs": 1,
                "post_sampling_probs": False,
            }
            req = urllib.request.Request(
                url + "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=1800) as r:
                reply = json.loads(r.read())
        tokens = [int(t) for t in reply.get("tokens", [])]
        probs = reply.get("completion_probabilities", [])
        if len(tokens) != n or len(probs) != n:
            raise RuntimeError(f"llama-server on {gguf.name}: asked for {n} tokens, got {len(tokens)} ({reply})")
        return tokens, [float(p["logprob"]) for p in probs]


def gguf_active_bytes(gguf: Path, top_k: int, n_experts: int, vocab: int) -> int:
    """Bytes one batch-1 decode step reads from a GGUF file, counted as ``active_weight_bytes``
    counts ours: every tensor, the stacked expert tensors (``*_exps``) at top_k / n_experts, one
    row of the embedding table."""
    from gguf import GGUFReader

    total = 0
    for t in GGUFReader(str(gguf)).tensors:
        size = int(t.n_bytes)
        if t.name == "token_embd.weight":
            size //= vocab
        elif "_exps" in t.name:
            size = size * top_k // n_experts
        total += size
    return total


__all__ = ["CONVERTED", "DEFAULT_HOME", "QUANTIZED", "SDIST_VERSION", "LlamaCpp", "gguf_active_bytes"]
