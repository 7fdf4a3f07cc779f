"""Where the bundled demo model lives (a 5.9M-parameter Shakespeare Mixtral shipped in the package)."""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent / "bundled"


def bundled_path() -> Path:
    """The bundled model's folder: ``load_model(bundled_path())``, ``load_tokenizer(bundled_path())``."""
    return BUNDLED


__all__ = ["BUNDLED", "bundled_path"]
