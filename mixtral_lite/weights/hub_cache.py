"""``--model org/name``: a model already in the local Hugging Face cache, found without a download.

People type hub names by habit. The cache layout is ``<cache>/models--org--name/snapshots/<commit>/``
with ``refs/main`` naming the commit; ``<cache>`` is ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``,
else ``~/.cache/huggingface/hub``. Nothing here touches the network: a name that is not in the
cache is an error that says how to fetch it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import UserError

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def resolve_model(name: str, flag: str = "--model") -> Path:
    """The folder ``name`` names: a local folder, else a hub name's snapshot in the local cache."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    if not HUB_NAME.match(name) or folder.exists():
        raise UserError(f"{flag} {name}: no such folder")
    repo = hub_cache_dir() / ("models--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    candidates = []
    if ref.is_file():
        candidates.append(snapshots / ref.read_text(encoding="utf-8").strip())
    if snapshots.is_dir():
        candidates += sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for snap in candidates:
        if (snap / "config.json").is_file() or (snap / "params.json").is_file():
            return snap
    raise UserError(
        f"{flag} {name}: no such folder, and not in the Hugging Face cache ({repo}); this tool never downloads: "
        f"fetch it first (e.g. `huggingface-cli download {name}`) or pass the folder"
    )


__all__ = ["hub_cache_dir", "resolve_model"]
