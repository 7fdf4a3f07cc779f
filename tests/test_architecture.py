"""The package's shape: the reference model imports no accelerator, the import graph has no cycle,
and the public API is importable from the top level."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import mixtral_lite
from mixtral_lite.model import mixtral

PACKAGE = Path(mixtral_lite.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at the top or inside a function), as absolute names; the
    ``if TYPE_CHECKING:`` blocks are left out (they never run)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not (name + ".").startswith(mod + "."):  # its own package is running already
                out.add(mod)
            for alias in node.names:  # ``from . import native``: a module, not a name
                if (PACKAGE.parent / (mod.replace(".", "/") + f"/{alias.name}.py")).exists():
                    out.add(f"{mod}.{alias.name}")
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for imp in _imports(path):
            # a submodule import also runs its packages' __init__
            parts = imp.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in files and candidate != name and not name.startswith(candidate + "."):
                    deps.add(candidate)  # (its own packages are running already)
            if not imp.startswith("mixtral_lite"):
                deps.add(imp)
        graph[name] = deps
    return graph


def _reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_reference_model_imports_no_accelerator() -> None:
    """The module that defines ``Mixtral`` reaches, through everything it imports inside the package,
    neither the CPU backend nor ctypes."""
    graph = _graph()
    start = mixtral.Mixtral.__module__
    assert start == "mixtral_lite.model.mixtral"
    reached = _reached(graph, start)
    inside = {m for m in reached if m.startswith("mixtral_lite")}
    assert inside, reached
    assert not {m for m in inside if m.startswith("mixtral_lite.cpu")}, sorted(inside)
    assert "ctypes" not in reached
    assert not list((PACKAGE / "model").rglob("*.c")) and not list((PACKAGE / "model").rglob("*.h"))
    for path in (PACKAGE / "model").glob("*.py"):
        text = path.read_text()
        assert "native" not in text and "csrc" not in text, path  # no kernel entry point named


def test_import_graph_has_no_cycle() -> None:
    graph = {k: {d for d in v if d.startswith("mixtral_lite")} for k, v in _graph().items()}
    # a package's __init__ that re-exports its modules is part of each of them: fold it away
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                if not all(_is_reexport(a, b) for a, b in zip(cycle, cycle[1:], strict=False)):
                    raise AssertionError(" -> ".join(cycle))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def _is_reexport(a: str, b: str) -> bool:
    """``pkg/__init__`` importing ``pkg.x`` (and ``pkg.x`` running ``pkg/__init__`` first)."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_block_forward_is_short() -> None:
    source = inspect.getsource(mixtral.Block.forward)
    body = source[source.index(":\n", source.index(") ->")) + 2 :]
    lines = [line for line in body.splitlines() if line.strip()]
    assert len(lines) <= 10, body


def test_public_api() -> None:
    names = (
        "MixtralConfig Mixtral load_model save_pretrained count_parameters load_tokenizer generate stream "
        "KVCache GenerationResult SamplingParams install_cpu_kernels uninstall_cpu_kernels cpu_kernels_status"
    ).split()
    for name in names:
        assert getattr(mixtral_lite, name) is not None, name
        assert name in mixtral_lite.__all__, name
    assert mixtral_lite.Mixtral is mixtral.Mixtral
