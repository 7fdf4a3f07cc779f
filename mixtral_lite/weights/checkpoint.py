"""Checkpoint folders: find the layout from the files present, read tensor headers without touching
the weights, check every key and shape against the model, and hand out tensors one at a time.

Layouts (chosen from the files in the folder, never from its name):

- ``hf``: ``config.json`` + ``model.safetensors``, or ``model.safetensors.index.json`` + the shards
  it names. Key names: the hub's (``block_sparse_moe.experts.N.w1``), transformers 5.x fused
  experts (``mlp.experts.gate_up_proj``), or, for ``model_type: mixtral_lite`` variant checkpoints,
  our own parameter names (a key equal to one of our names maps to itself). The other families
  (OLMoE, Qwen2/3-MoE, DeepSeek-V2/V3: ``config.family``) are read with their own key table.
- ``mistral``: ``params.json`` + ``consolidated.safetensors`` or ``consolidated.00.pth``. Original
  key names; wq/wk rows rotate interleaved pairs and are converted to our half-split RoPE layout.

Tensors are views into memory-mapped files: reading one costs nothing until it is copied, and
``release`` drops its pages from this process again, so resident memory holds one tensor of the
file at a time, not the file.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import MixtralConfig, read_json
from ..errors import UserError
from .keymap import hf_items, layout_of, map_key_chunks
from .quantized import QuantizationConfig, read_quantization_config

# safetensors dtype names -> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# Source dtypes a floating-point parameter may be cast from (fp8 would need scales we do not read).
WEIGHT_DTYPES = ("F32", "F16", "BF16", "F64")

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # a header larger than this is corrupt, not a real checkpoint
READ_ATTEMPTS = 20
SAVE_ID_KEY = "mixtral_lite_save_id"  # written by save_pretrained into config.json, the index and every shard


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in ``file`` (-1 for .pth)
    nbytes: int


@dataclass(frozen=True)
class Copy:
    """One file tensor (or one chunk of it) into our parameter ``name`` (or one expert slice)."""

    key: str
    name: str
    expert: int | None
    dim: int = 0  # chunk ``index`` of ``count`` along ``dim`` of the file tensor (fused keys)
    index: int = 0
    count: int = 1
    rope_heads: int | None = None  # Mistral wq/wk: rows go from interleaved pairs to half-split


@dataclass
class TensorPlan:
    copies: list[Copy]  # in file read order
    problems: list[str]
    naming: list[str]  # which key tables matched, for display


@dataclass
class Checkpoint:
    folder: Path
    layout: str  # "hf" | "mistral"
    config_file: Path
    config: MixtralConfig
    model_type: str  # config.json model_type ("mixtral", "mixtral_lite") or "mistral" for params.json
    format: str  # "safetensors" | "pth"
    files: list[Path]
    index_file: Path | None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # file-level problems (strict=False only)
    broken: set[Path] = field(default_factory=set)  # files whose tensors were left out (strict=False)
    config_dtype: str | None = None
    # Layers in the files past the model's: DeepSeek-V3's multi-token-prediction module
    # (``num_nextn_predict_layers``), used for training and speculation, not for generation.
    extra_layers: range = range(0)
    save_ids: dict[str, str | None] = field(default_factory=dict)  # file name -> save id (see ``saving``)
    quantization: QuantizationConfig | None = None  # a quantised checkpoint's config (``quantized.py``)
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)
    _pth: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, key: str) -> torch.Tensor:
        """A zero-copy view of a file tensor (valid until ``close``); copy it where it belongs."""
        info = self.tensors[key]
        if self._pth is not None:
            return self._pth[key]
        dtype = SAFETENSORS_DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = self._maps[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # read-only buffer: we never write through the view
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(mm, dtype=dtype, count=info.nbytes // dtype.itemsize, offset=info.offset)
        return flat.view(info.shape)

    def release(self, key: str, upto: int | None = None) -> None:
        """Drop a read tensor's file pages from this process (the OS page cache keeps them);
        ``upto``: only its first ``upto`` bytes, the whole pages among them (a tensor consumed in
        row blocks gives its pages back as it goes)."""
        info = self.tensors[key]
        if self._pth is not None:
            if upto is None:
                storage = self._pth[key].untyped_storage()
                _drop_pages(storage.data_ptr(), storage.nbytes())
            return
        mm = self._maps.get(info.file)
        if mm is None or info.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        end = info.offset + info.nbytes
        if upto is not None:
            end = info.offset + min(upto, info.nbytes)
            end -= end % mmap.PAGESIZE  # a page still partly unread stays
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; the map goes when that does
                pass
        self._maps.clear()
        self._pth = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_pages(address: int, nbytes: int) -> None:
    """madvise(DONTNEED) over a private read-only file mapping: pages refault from the file if needed."""
    if nbytes <= 0 or not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    start = address - address % page
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), mmap.MADV_DONTNEED)


# ---- finding the layout ------------------------------------------------------------------------


def open_checkpoint(path: str | Path, *, strict: bool = True) -> Checkpoint:
    """Detect the layout, read the config and every tensor header (no weight data is read).

    With ``strict`` a broken weight file raises ``UserError``; without, it is recorded in
    ``problems`` and its tensors are left out (``mixtral-lite info`` lists them all). Every file is
    mapped as its header is read, and files whose save ids differ (a save switched the folder
    meanwhile) are read again, so a reader gets one save's folder, never a mix.
    """
    folder = Path(path)
    for _ in range(READ_ATTEMPTS):
        ino = _inode(folder)
        try:
            ckpt = _open_once(folder, strict)
        except UserError:
            if _inode(folder) == ino:
                raise
            continue  # a save switched the folder while we listed it: read the new one
        if len({v for v in ckpt.save_ids.values() if v is not None}) <= 1:
            return ckpt
        ckpt.close()  # files of two saves: a save switched the folder while we read it; read again
    raise UserError(f"{folder}: its files kept changing while being read ({READ_ATTEMPTS} tries); is a save running?")


def _inode(folder: Path) -> int | None:
    try:
        return os.stat(folder).st_ino
    except OSError:
        return None


def _open_once(folder: Path, strict: bool) -> Checkpoint:
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (expected a checkpoint folder)")
    has = {p.name for p in folder.iterdir() if p.is_file()}
    if "config.json" in has and (SINGLE_FILE in has or INDEX_FILE in has):
        return _open_hf(folder, has, strict)
    if "params.json" in has and ("consolidated.safetensors" in has or "consolidated.00.pth" in has):
        return _open_mistral(folder, has, strict)
    if "config.json" not in has and "params.json" not in has:
        raise UserError(f"{folder}: no config.json (Hugging Face) or params.json (Mistral) in this folder")
    found = ", ".join(sorted(has)[:12]) or "nothing"
    hint = " (.bin checkpoints are not supported: convert them to safetensors)" if "pytorch_model.bin" in has else ""
    raise UserError(
        f"{folder}: no weights: expected {SINGLE_FILE} or {INDEX_FILE} beside config.json, or "
        f"consolidated.safetensors / consolidated.00.pth beside params.json; found {found}{hint}"
    )


def _open_hf(folder: Path, has: set[str], strict: bool) -> Checkpoint:
    config_file = folder / "config.json"
    raw = read_json(config_file)
    config = MixtralConfig.from_hf_dict(raw, source=str(config_file))
    ckpt = Checkpoint(
        folder=folder,
        layout="hf",
        config_file=config_file,
        config=config,
        model_type=raw.get("model_type", ""),
        format="safetensors",
        files=[],
        index_file=None,
        config_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        quantization=read_quantization_config(raw.get("quantization_config"), str(config_file)),
    )
    mtp = raw.get("num_nextn_predict_layers") or raw.get("num_mtp_layers") or 0
    if config.family == "deepseek_v3" and isinstance(mtp, int) and mtp > 0:
        ckpt.extra_layers = range(config.num_hidden_layers, config.num_hidden_layers + mtp)
    ckpt.save_ids["config.json"] = raw.get(SAVE_ID_KEY)
    if SINGLE_FILE in has:
        ckpt.files = [folder / SINGLE_FILE]
        _read_headers(ckpt, strict)
        return ckpt
    ckpt.index_file = folder / INDEX_FILE
    weight_map, ckpt.save_ids[INDEX_FILE] = _read_index(ckpt.index_file)
    ckpt.files = [folder / name for name in sorted(set(weight_map.values()))]
    for f in ckpt.files:
        if not f.is_file():
            _problem(ckpt, strict, f"{ckpt.index_file}: names shard {f.name}, which is not in {folder}", f)
    _read_headers(ckpt, strict)
    for key, name in weight_map.items():
        info = ckpt.tensors.get(key)
        if info is not None and info.file.name != name:
            _problem(ckpt, strict, f"{ckpt.index_file}: {key} is listed in {name} but found in {info.file.name}")
        elif info is None and (folder / name) not in ckpt.broken:
            _problem(ckpt, strict, f"{ckpt.index_file}: {key} is listed in {name}, which does not hold it")
    return ckpt


def _open_mistral(folder: Path, has: set[str], strict: bool) -> Checkpoint:
    config_file = folder / "params.json"
    config = MixtralConfig.from_pretrained(config_file)
    parts = sorted(n for n in has if re.fullmatch(r"consolidated\.\d+\.pth", n))
    if len(parts) > 1 and "consolidated.safetensors" not in has:
        raise UserError(
            f"{folder}: {len(parts)} model-parallel shards ({', '.join(parts[:3])}, ...): "
            "expected one consolidated.00.pth (merge the shards first)"
        )
    safetensors = "consolidated.safetensors" in has
    ckpt = Checkpoint(
        folder=folder,
        layout="mistral",
        config_file=config_file,
        config=config,
        model_type="mistral",
        format="safetensors" if safetensors else "pth",
        files=[folder / ("consolidated.safetensors" if safetensors else "consolidated.00.pth")],
        index_file=None,
    )
    if safetensors:
        _read_headers(ckpt, strict)
    else:
        _read_pth(ckpt, strict)
    return ckpt


def _read_index(path: Path) -> tuple[dict[str, str], str | None]:
    data = read_json(path)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"{path}: expected a non-empty 'weight_map' object of key -> shard file")
    for key, name in weight_map.items():
        plain = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        if not plain:
            raise UserError(
                f"{path}: weight_map[{key!r}] = {name!r}: expected a plain file name inside the folder "
                "(no directories, '..' or absolute paths)"
            )
    meta = data.get("metadata")
    return weight_map, meta.get(SAVE_ID_KEY) if isinstance(meta, dict) else None


def _problem(ckpt: Checkpoint, strict: bool, message: str, file: Path | None = None) -> None:
    if strict:
        raise UserError(message)
    ckpt.problems.append(message)
    if file is not None:
        ckpt.broken.add(file)


def _read_headers(ckpt: Checkpoint, strict: bool) -> None:
    for f in ckpt.files:
        if f in ckpt.broken:
            continue
        try:
            infos, meta, mm = _read_header(f, keep_map=True)
        except UserError as exc:
            _problem(ckpt, strict, str(exc), f)
            continue
        if mm is not None:
            ckpt._maps[f] = mm
        ckpt.save_ids[f.name] = meta.get(SAVE_ID_KEY)
        for info in infos:
            if info.key in ckpt.tensors:
                other = ckpt.tensors[info.key].file.name
                _problem(ckpt, strict, f"{f}: {info.key} is also in {other} (a key must be in one file)")
                continue
            ckpt.tensors[info.key] = info


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse a safetensors header and check it with ``check_safetensors_header``."""
    return _read_header(path)[0]


def _read_header(path: Path, keep_map: bool = False) -> tuple[list[TensorInfo], dict, mmap.mmap | None]:
    """Tensors and metadata of a safetensors file, and (``keep_map``) a map of the very file the
    header came from, so that its data cannot be of another save that replaced the file since."""
    try:
        f = open(path, "rb")
        size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise UserError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: corrupt safetensors header: {exc}") from None
        infos = check_safetensors_header(path, header, 8 + n, size)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if keep_map and size > 8 + n else None
    return infos, header.get("__metadata__") or {}, mm


def check_safetensors_header(path: Path, header: object, base: int, size: int) -> list[TensorInfo]:
    """The one validator of safetensors headers (``load_model``, parallel loading and ``info`` all
    read headers through it): every entry an object of a known dtype, a shape of non-negative ints
    and integer offsets; byte counts matching dtype x shape; tensors in order, not overlapping, no
    gap, and together covering the data section (``base`` .. ``size``) exactly. Returns the tensors
    in file order; raises ``UserError`` naming the file and key otherwise."""
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header: expected an object, got {type(header).__name__}")
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise UserError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
    infos = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        where = f"{path}: {key}: corrupt safetensors header"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise UserError(f"{where}: expected an object with dtype, shape and data_offsets, got {entry!r:.200}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise UserError(
                f"{path}: {key}: unsupported dtype {dtype!r:.60} (expected one of {', '.join(SAFETENSORS_DTYPES)})"
            )
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise UserError(f"{where}: shape: expected a list of non-negative integers, got {shape!r:.200}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise UserError(f"{where}: data_offsets: expected [begin, end] integers, got {offsets!r:.200}")
        begin, end = offsets
        numel = 1
        for s in shape:
            numel *= s
        if not 0 <= begin <= end or end - begin != numel * SAFETENSORS_DTYPES[dtype].itemsize:
            raise UserError(f"{where}: data_offsets {offsets} do not hold {dtype} {shape}")
        infos.append(TensorInfo(key, path, dtype, tuple(shape), base + begin, end - begin))
    infos.sort(key=lambda t: (t.offset, t.nbytes))
    pos = base
    for t in infos:
        if t.offset != pos:
            what = "overlaps the tensor before it" if t.offset < pos else f"leaves a gap of {t.offset - pos} bytes"
            raise UserError(f"{path}: {t.key}: corrupt safetensors header: its data {what}")
        pos = t.offset + t.nbytes
    if pos > size:
        last = infos[-1]
        raise UserError(
            f"{path}: truncated: the last tensor ({last.key}) ends at byte {pos:,} but the file has {size:,} bytes"
        )
    if pos != size:
        raise UserError(f"{path}: corrupt safetensors file: {size - pos:,} bytes after the last tensor")
    return infos


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_pth(ckpt: Checkpoint, strict: bool) -> None:
    f = ckpt.files[0]
    try:
        state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{f}: refusing to unpickle: the file needs arbitrary Python objects, only tensors are "
            f"allowed (torch.load weights_only=True): {first}"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{f}: not a readable PyTorch checkpoint: {first}") from None
    if not isinstance(state, dict):
        raise UserError(f"{f}: expected a dict of name -> tensor, got {type(state).__name__}")
    ckpt._pth = {}
    for key, t in state.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            _problem(ckpt, strict, f"{f}: {key!r}: expected a tensor, got {type(t).__name__}")
            continue
        name = DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))
        ckpt._pth[key] = t
        ckpt.tensors[key] = TensorInfo(key, f, name, tuple(t.shape), -1, t.numel() * t.element_size())


# ---- matching file keys to the model -----------------------------------------------------------


def match_tensors(ckpt: Checkpoint, expected: dict[str, torch.Tensor], aliases: dict[str, str]) -> TensorPlan:
    """Map every file tensor onto the model's tensors and check shapes, dtypes and coverage.

    ``expected`` maps our names to (meta) tensors giving shape and dtype; ``aliases`` maps a tied
    name (``output.weight``) to the tensor it shares, whose file copy, if any, is checked and skipped.
    Problems are collected, not raised, so ``info`` can list them all; the loader raises them.
    """
    config = ckpt.config
    layout = "mistral" if ckpt.layout == "mistral" else layout_of(config.family)
    own_names = ckpt.model_type == "mixtral_lite"
    rope = {"attention.wq.weight": config.num_attention_heads, "attention.wk.weight": config.num_key_value_heads}
    copies: list[Copy] = []
    problems: list[str] = []
    unexpected: list[str] = []
    naming: dict[str, None] = {}
    filled: dict[str, dict[int | None, str]] = {}  # name -> {expert (None = whole): file key}
    extra: list[str] = []
    for key, info in ckpt.tensors.items():
        layer = _LAYER.match(key)
        if layer is not None and int(layer.group(1)) in ckpt.extra_layers:
            extra.append(key)
            continue
        if own_names and key in expected:
            chunks = [(key, None, 0, 0, 1)]
            naming["mixtral_lite (own names)"] = None
        else:
            found = map_key_chunks(key, layout)
            if found is None:
                unexpected.append(key)
                continue
            chunks = [(c.target.name, c.target.expert, c.dim, c.index, c.count) for c in found]
            naming[_naming(key, layout)] = None
        for name, expert, dim, index, count in chunks:
            alias = aliases.get(name)
            target = expected.get(alias or name)
            if target is None:
                unexpected.append(key)
                break
            error = _check(info, target, expert, dim, count, name)
            if error is not None:
                problems.append(f"{info.file.name}: {key}: {error}")
            if alias is not None:
                continue  # tied to ``alias``: its own key fills it
            slots = filled.setdefault(name, {})  # filled even when wrong, so it is not also reported missing
            clash = next(iter(slots.values()), None) if expert is None else slots.get(expert) or slots.get(None)
            if clash is not None:
                problems.append(f"{info.file.name}: {key}: {name} is already filled by {clash}")
                continue
            slots[expert] = key
            if error is None:
                heads = rope.get(name.split(".", 2)[-1]) if layout == "mistral" and name.startswith("layers.") else None
                copies.append(Copy(key, name, expert, dim, index, count, heads))
    if unexpected:
        problems.append(f"unexpected keys (not part of this model): {_some(unexpected)}")
    missing = []
    for name, t in expected.items():
        slots = filled.get(name, {})
        if None in slots:
            continue
        lacking = None if not slots else [e for e in range(t.shape[0]) if e not in slots]  # expert by expert
        if lacking == []:
            continue
        missing += _file_keys(name, t, lacking) if layout == "hf" and not own_names else [name]
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if extra:
        layers = f"{ckpt.extra_layers.start}-{ckpt.extra_layers.stop - 1}"
        naming[f"multi-token-prediction layer(s) {layers}: {len(extra)} keys not read (not used to generate)"] = None
    order = {key: (str(info.file), info.offset, i) for i, (key, info) in enumerate(ckpt.tensors.items())}
    copies.sort(key=lambda c: order[c.key])
    return TensorPlan(copies, problems, list(naming))


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _check(info: TensorInfo, target: torch.Tensor, expert: int | None, dim: int, count: int, name: str) -> str | None:
    """What is wrong with feeding file tensor ``info`` (or one chunk of it) into ``target``, if anything."""
    want = list(target.shape)
    if expert is not None:
        if not 0 <= expert < want[0]:
            return f"expert {expert} out of range (the model has {want[0]} experts)"
        want = want[1:]
    if count > 1 and dim < len(want):
        want[dim] *= count
    if list(info.shape) != want:
        return f"shape expected {want} (for {name}), got {list(info.shape)}"
    if target.is_floating_point():
        if info.dtype not in WEIGHT_DTYPES:
            return f"unsupported dtype {info.dtype} (expected one of {', '.join(WEIGHT_DTYPES)})"
    elif SAFETENSORS_DTYPES.get(info.dtype) != target.dtype:
        return f"dtype expected {DTYPE_NAMES.get(target.dtype)}, got {info.dtype}"
    return None


def _file_keys(name: str, t: torch.Tensor, experts: list[int] | None) -> list[str]:
    """The hub keys that would fill ``name`` (only the given experts of a stacked tensor)."""
    try:
        keys = [k for k, _ in hf_items({name: t})]
    except KeyError:
        return [name]
    if experts is not None and len(keys) == t.shape[0]:
        keys = [keys[e] for e in experts]
    return keys


def _naming(key: str, layout: str) -> str:
    if layout == "mistral":
        return "Mistral original"
    if layout != "hf":
        fused = ".mlp.experts.gate_up_proj" in key or key.endswith(".mlp.experts.down_proj")
        return f"{layout} (Hugging Face{', transformers 5.x fused experts' if fused else ''})"
    if ".mlp." in key:
        return "transformers 5.x fused experts"
    return "Hugging Face hub"


def _some(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def interleaved_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of an original-layout wq/wk (RoPE on pairs x0,x1 | x2,x3 ...) in half-split order.

    Within each head, row 2i+j moves to row j*hd/2 + i, so pair (x_2i, x_2i+1) becomes
    (x_i, x_i+hd/2), the pair the half-split rotation turns. This is the permutation Hugging Face's
    Mistral-to-HF converter applies. w [heads*hd, D] -> [heads*hd, D] (a view when possible).
    """
    rows, dim = w.shape
    return w.view(heads, rows // heads // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def half_to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``interleaved_to_half`` (used to write original-layout checkpoints)."""
    rows, dim = w.shape
    return w.view(heads, 2, rows // heads // 2, dim).transpose(1, 2).reshape(rows, dim)


__all__ = [
    "Checkpoint",
    "Copy",
    "TensorPlan",
    "TensorInfo",
    "open_checkpoint",
    "match_tensors",
    "read_safetensors_header",
    "interleaved_to_half",
    "half_to_interleaved",
]
