"""Per-rank loading: each rank reads only its own slices of the safetensors files.

``safe_open(...).get_slice(key)[rows, cols]`` copies just the requested region out of the memory
map, so a rank touches (and keeps) about 1/N of the split weights: whole heads of ``wq wk wv``,
the matching columns of ``wo``, its experts (``--ep``) and its rows / columns of each expert's
intermediate dimension (``--tp``). Embeddings, norms, router and lm head are replicated.

The model is built on the meta device with full shapes; each parameter is then replaced by a
tensor of the rank's local shape and filled slice by slice, strictly: every expected slice must be
found once, and a key the key table does not know is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..config import MixtralConfig
from ..errors import UserError
from ..keymap import Chunk, map_key_chunks
from ..model import Mixtral
from .dist import ParallelError, ParallelState
from .shard import _set_parameter, check_parallel, configure, local_shape, param_slices


def load_parallel(
    path: str | Path,
    state: ParallelState,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Mixtral:
    """This rank's shard of the checkpoint in folder ``path`` (eval mode, hooks set).

    ``dtype`` None keeps the file's dtype; ``device`` defaults to ``state.device``.
    """
    path = Path(path)
    config = MixtralConfig.from_pretrained(path)
    check_parallel(config, state.tp, state.ep)
    device = torch.device(state.device if device is None else device)
    layout = "mistral" if (path / "params.json").is_file() and not (path / "config.json").is_file() else "hf"
    with torch.device("meta"):
        model = Mixtral(config)
    full = {name: tuple(p.shape) for name, p in model.named_parameters()}
    slices = {name: param_slices(name, shape, config, state) for name, shape in full.items()}
    local: dict[str, torch.Tensor] = {}
    written: dict[str, set[tuple[int, ...]]] = {name: set() for name in full}  # () whole, (e,) one expert

    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                chunks = map_key_chunks(key, layout)
                if chunks is None:
                    raise UserError(f"{file.name}: unexpected key {key!r} (not part of a Mixtral checkpoint)")
                part = f.get_slice(key)
                for chunk in chunks:
                    name = chunk.target.name
                    if name not in full:
                        raise UserError(f"{file.name}: key {key!r} maps to {name!r}, which this config does not have")
                    where = _file_region(chunk, tuple(part.get_shape()), full[name], slices[name], file, key)
                    if where is None:
                        continue  # an expert another rank owns
                    region, dest = where
                    if dest in written[name] or () in written[name] or (dest == () and written[name]):
                        raise UserError(f"{file.name}: key {key!r} writes {name!r} a second time")
                    t = part[region]
                    if layout == "mistral" and name.endswith(("attention.wq.weight", "attention.wk.weight")):
                        t = _interleaved_to_half(t, config.head_dim)
                    if name not in local:
                        local[name] = torch.empty(local_shape(slices[name]), dtype=dtype or t.dtype, device=device)
                    local[name][dest].copy_(t)
                    written[name].add(dest)

    if config.tie_word_embeddings:
        written.pop("output.weight", None)
    for name, done in written.items():
        experts = {(e,) for e in range(local_shape(slices[name])[0])}
        if () not in done and done != experts:
            what = "missing" if not done else f"has {len(done)} of {len(experts)} experts"
            raise UserError(f"{path}: parameter {name!r} {what} in the checkpoint")
    with torch.no_grad():
        for name, t in local.items():
            _set_parameter(model, name, nn.Parameter(t, requires_grad=False))
    if config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise UserError(f"{path}: no values for {leftover}")
    return configure(model, state).eval()


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (through the index when there is one)."""
    for index_name in ("model.safetensors.index.json", "consolidated.safetensors.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pth = sorted(path.glob("*.pth"))
        hint = f" (found {pth[0].name}: parallel loading reads safetensors slices, convert it first)" if pth else ""
        raise ParallelError(f"{path}: no *.safetensors files{hint}")
    return files


def _file_region(
    chunk: Chunk,
    file_shape: tuple[int, ...],
    full_shape: tuple[int, ...],
    slices: tuple[slice, ...],
    file: Path,
    key: str,
) -> tuple[tuple[slice, ...], tuple[int, ...]] | None:
    """(region of the file tensor, index into the local parameter) for one chunk, or None if not ours."""
    expert = chunk.target.expert
    want = list(full_shape[1:] if expert is not None else full_shape)
    region = list(slices[1:] if expert is not None else slices)
    if chunk.count > 1:
        want[chunk.dim] *= chunk.count
    if tuple(want) != file_shape:
        raise UserError(f"{file.name}: {key}: expected shape {tuple(want)}, got {file_shape}")
    if chunk.count > 1:  # a fused key: our tensor is chunk ``index`` of ``count`` along ``dim``
        offset = chunk.index * (file_shape[chunk.dim] // chunk.count)
        s = region[chunk.dim]
        region[chunk.dim] = slice(offset + s.start, offset + s.stop)
    if expert is None:
        return tuple(region), ()
    owned = slices[0]
    if not owned.start <= expert < owned.stop:
        return None
    return tuple(region), (expert - owned.start,)


def _interleaved_to_half(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of whole heads in the original interleaved rotary layout -> the half-split layout."""
    d = w.shape[-1]
    return w.view(-1, head_dim // 2, 2, d).transpose(1, 2).reshape(-1, d)
