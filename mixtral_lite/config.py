"""Model configuration: a typed dataclass with explicit constructors.

Field names follow the Hugging Face ``config.json`` of Mixtral, so a user who knows the hub file
knows this class. The MoE section is nested (``MoEConfig``) so routing variants live in one place;
the other checkpoint families (``families.py``) add an ``attention`` section (q/k norms, biases,
latent attention) and ``rope_scaling`` (YaRN), each off by default.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import families
from .errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent / "configs"

ROUTER_KINDS = ("topk", "hard", "soft", "hierarchical")
SCORE_FUNCS = ("softmax", "sigmoid")


@dataclass
class MoEConfig:
    """The sparse feed-forward section.

    ``kind`` selects the routing rule: ``topk`` (Mixtral: softmax, top-k, renormalise), ``hard``
    (top-1 with a capacity factor), ``soft`` (every expert, weighted by the full softmax) and
    ``hierarchical`` (a gate over groups, then a gate inside each group). The DeepSeekMoE options
    (shared experts, sigmoid scoring with bias-only selection, group-limited routing, dense first
    layers) combine with ``topk``.
    """

    num_experts: int = 8
    num_experts_per_tok: int = 2
    kind: str = "topk"
    capacity_factor: float = 1.25  # hard routing only
    num_groups: int = 1  # hierarchical: groups of experts; top_k_groups picked by the top gate
    top_k_groups: int = 1
    n_shared_experts: int = 0  # DeepSeekMoE: always-on experts of the same size as routed ones
    score_func: str = "softmax"  # "sigmoid": DeepSeek-V3 scoring
    bias_balancing: bool = False  # DeepSeek-V3 auxiliary-loss-free balancing (selection bias)
    bias_update_speed: float = 1e-3
    n_group: int = 1  # DeepSeek-V3 group-limited routing
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense: int = 0  # the first k layers use a dense FFN
    dense_intermediate_size: int | None = None  # size of those dense FFNs (default: I * top_k)
    # Options the other checkpoint families need (families.py reads them from their config.json).
    norm_topk_prob: bool = True  # renormalise the k chosen weights to sum 1 (Mixtral); False: as scored
    group_score_topk: int = 2  # group-limited routing: a group scores the sum of its best this many (V2: 1)
    router_float32: bool = False  # DeepSeek: the router's product in float32 whatever the weights' dtype
    n_shared_intermediate: int | None = None  # size of the shared FFN (default: n_shared_experts * I)
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared FFN's output times sigmoid(Linear(h, 1))
    sparse_step: int = 1  # Qwen: layer l is sparse when (l + 1) % sparse_step == 0
    dense_layers: list[int] = field(default_factory=list)  # Qwen's mlp_only_layers: dense FFN layers

    def __post_init__(self) -> None:
        _check_fields(self)
        _positive(self, "num_experts", "num_experts_per_tok")
        if self.kind not in ROUTER_KINDS:
            raise ConfigError(f"moe.kind: expected one of {ROUTER_KINDS}, got {self.kind!r}")
        if self.score_func not in SCORE_FUNCS:
            raise ConfigError(f"moe.score_func: expected one of {SCORE_FUNCS}, got {self.score_func!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"moe.num_experts_per_tok: must be <= num_experts ({self.num_experts}), got {self.num_experts_per_tok}"
            )
        if self.kind == "hard" and self.num_experts_per_tok != 1:
            raise ConfigError(f"moe.num_experts_per_tok: hard routing is top-1, got {self.num_experts_per_tok}")
        if self.capacity_factor <= 0:
            raise ConfigError(f"moe.capacity_factor: must be > 0, got {self.capacity_factor}")
        _positive(self, "num_groups", "top_k_groups", "n_group", "topk_group")
        if self.num_experts % self.num_groups:
            raise ConfigError(f"moe.num_groups: must divide num_experts ({self.num_experts}), got {self.num_groups}")
        if self.top_k_groups > self.num_groups:
            raise ConfigError(f"moe.top_k_groups: must be <= num_groups ({self.num_groups}), got {self.top_k_groups}")
        if self.kind == "hierarchical" and self.num_experts_per_tok > self.num_experts // self.num_groups:
            raise ConfigError(
                "moe.num_experts_per_tok: hierarchical routing picks top-k inside one group of "
                f"{self.num_experts // self.num_groups} experts, got {self.num_experts_per_tok}"
            )
        if self.num_experts % self.n_group:
            raise ConfigError(f"moe.n_group: must divide num_experts ({self.num_experts}), got {self.n_group}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"moe.topk_group: must be <= n_group ({self.n_group}), got {self.topk_group}")
        for name in ("n_shared_experts", "first_k_dense"):
            if getattr(self, name) < 0:
                raise ConfigError(f"moe.{name}: must be >= 0, got {getattr(self, name)}")
        if self.bias_balancing and self.kind != "topk":
            raise ConfigError(f"moe.bias_balancing: only for kind 'topk', got kind {self.kind!r}")
        if self.kind != "topk" and (
            self.score_func != "softmax" or self.n_group != 1 or self.routed_scaling_factor != 1
        ):
            raise ConfigError(
                f"moe.kind: score_func, n_group and routed_scaling_factor are DeepSeek options of kind 'topk', "
                f"got kind {self.kind!r}"
            )
        if self.topk_group * (self.num_experts // self.n_group) < self.num_experts_per_tok:
            raise ConfigError(
                f"moe.topk_group: {self.topk_group} group(s) of {self.num_experts // self.n_group} experts cannot "
                f"supply num_experts_per_tok={self.num_experts_per_tok}"
            )
        if not self.routed_scaling_factor > 0:
            raise ConfigError(f"moe.routed_scaling_factor: must be > 0, got {self.routed_scaling_factor}")
        _positive(self, "group_score_topk", "sparse_step")
        if self.group_score_topk > self.num_experts // self.n_group:
            raise ConfigError(
                f"moe.group_score_topk: must be <= the {self.num_experts // self.n_group} experts of a group, "
                f"got {self.group_score_topk}"
            )
        if self.n_shared_intermediate is not None and (self.n_shared_intermediate < 1 or not self.n_shared_experts):
            raise ConfigError(
                f"moe.n_shared_intermediate: must be >= 1 and needs n_shared_experts, got {self.n_shared_intermediate}"
            )
        if self.shared_expert_gate and not self.n_shared_experts:
            raise ConfigError("moe.shared_expert_gate: needs a shared expert (n_shared_experts >= 1)")
        if self.kind != "topk" and (not self.norm_topk_prob or self.router_float32):
            raise ConfigError(f"moe.norm_topk_prob, moe.router_float32: options of kind 'topk', got kind {self.kind!r}")
        if any(i < 0 for i in self.dense_layers):
            raise ConfigError(f"moe.dense_layers: layer indices must be >= 0, got {self.dense_layers}")

    @property
    def is_plain_mixtral(self) -> bool:
        """True when this section describes Mixtral's own router (loadable by transformers)."""
        return self == MoEConfig(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)


QK_NORMS = (None, "head", "full")
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3")


@dataclass
class AttentionConfig:
    """Attention beyond Mixtral's plain grouped-query attention (all off by default).

    ``qk_norm``: RMSNorm of queries and keys, per head (``head``, Qwen3-MoE) or over the whole
    projection before the head split (``full``, OLMoE). ``kv_lora_rank`` set means multi-head
    latent attention (DeepSeek-V2/V3): keys and values come from a small latent, which is all the
    cache holds; ``head_dim`` is then the rotary part (``qk_rope_head_dim``).
    """

    qkv_bias: bool = False  # Qwen2-MoE: biases on the q, k, v projections
    qk_norm: str | None = None
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to [-clip, clip]
    kv_lora_rank: int | None = None
    q_lora_rank: int | None = None  # None: queries from one projection
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary pairs (x0, x1), (x2, x3), ... instead of halves (DeepSeek)
    latent_norm_eps: float = 1e-6  # transformers builds MLA's q/kv latent norms with this, not rms_norm_eps

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"attention.qk_norm: expected one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ConfigError(f"attention.clip_qkv: must be > 0 or null, got {self.clip_qkv}")
        if self.kv_lora_rank is None:
            if self.q_lora_rank is not None or self.qk_nope_head_dim or self.v_head_dim:
                raise ConfigError("attention.q_lora_rank, qk_nope_head_dim, v_head_dim: need kv_lora_rank (MLA)")
            return
        _positive(self, "kv_lora_rank", "qk_nope_head_dim", "v_head_dim")
        if self.q_lora_rank is not None:
            _positive(self, "q_lora_rank")
        if self.qkv_bias or self.qk_norm or self.clip_qkv is not None:
            raise ConfigError("attention: qkv_bias, qk_norm and clip_qkv are not options of latent attention")

    @property
    def latent(self) -> bool:
        """Multi-head latent attention (DeepSeek)."""
        return self.kv_lora_rank is not None


ROPE_TYPES = ("yarn",)


@dataclass
class RopeScaling:
    """YaRN rotary scaling as transformers computes it (``_compute_yarn_parameters``); DeepSeek-V2/V3
    use it for their long context. ``factor`` None: max_position_embeddings / original."""

    rope_type: str = "yarn"
    factor: float | None = None
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling.rope_type: expected one of {ROPE_TYPES}, got {self.rope_type!r}")
        _positive(self, "original_max_position_embeddings")
        for name in ("factor", "beta_fast", "beta_slow"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"rope_scaling.{name}: must be > 0, got {value}")


@dataclass
class MixtralConfig:
    """Shapes and hyper-parameters of a Mixtral-style decoder.

    Defaults are Mixtral-8x7B. ``head_dim`` defaults to ``hidden_size // num_attention_heads``.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # per expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int = 2
    moe: MoEConfig = field(default_factory=MoEConfig)
    # The checkpoint family this config was read from: it picks the key table, nothing else. The
    # computation is decided by the sections (``attention``, ``moe``, ``rope_scaling``) alone.
    family: str = "mixtral"
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        for name, kind in (("moe", MoEConfig), ("attention", AttentionConfig), ("rope_scaling", RopeScaling)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, kind(**_known(kind, value, name)))
            elif not isinstance(value, kind) and not (value is None and name == "rope_scaling"):
                raise ConfigError(f"{name}: expected an object, got {value!r:.80}")
        _check_fields(self)
        if self.family not in FAMILIES:
            raise ConfigError(f"family: expected one of {FAMILIES}, got {self.family!r}")
        _positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"num_attention_heads: must divide hidden_size ({self.hidden_size}) when head_dim "
                    f"is not given, got {self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _positive(self, "head_dim")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim: must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads: must divide num_attention_heads ({self.num_attention_heads}), "
                f"got {self.num_key_value_heads}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window: must be >= 1 or null, got {self.sliding_window}")
        for name in ("rms_norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ConfigError(f"{name}: must be in [0, vocab_size={self.vocab_size}), got {value}")
        if self.moe.first_k_dense > self.num_hidden_layers:
            raise ConfigError(
                f"moe.first_k_dense: must be <= num_hidden_layers ({self.num_hidden_layers}), "
                f"got {self.moe.first_k_dense}"
            )
        bad = [i for i in self.moe.dense_layers if i >= self.num_hidden_layers]
        if bad:
            raise ConfigError(f"moe.dense_layers: layers {bad} are beyond num_hidden_layers ({self.num_hidden_layers})")

    def is_dense_layer(self, layer: int) -> bool:
        """Whether ``layer`` has a dense FFN instead of experts (DeepSeek's first layers, Qwen's
        ``mlp_only_layers`` and ``decoder_sparse_step``)."""
        moe = self.moe
        return layer < moe.first_k_dense or layer in moe.dense_layers or (layer + 1) % moe.sparse_step != 0

    @property
    def dense_intermediate_size(self) -> int:
        """Hidden size of the dense FFN layers."""
        return self.moe.dense_intermediate_size or self.intermediate_size * self.moe.num_experts_per_tok

    @property
    def shared_intermediate_size(self) -> int:
        """Hidden size of the shared FFN (0 without shared experts)."""
        return self.moe.n_shared_intermediate or self.moe.n_shared_experts * self.intermediate_size

    @property
    def is_plain_mixtral(self) -> bool:
        """True when transformers' ``MixtralForCausalLM`` computes exactly this model."""
        return (
            self.family == "mixtral"
            and self.moe.is_plain_mixtral
            and self.attention == AttentionConfig()
            and self.rope_scaling is None
        )

    # Convenience views of the MoE section.
    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    @property
    def num_experts_per_tok(self) -> int:
        return self.moe.num_experts_per_tok

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str) -> MixtralConfig:
        """Read ``configs/<name>.json`` (exact name; ``available_presets()`` lists them)."""
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name!r}: expected one of {available_presets()}")
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> MixtralConfig:
        """Read a Hugging Face ``config.json`` or a Mistral ``params.json`` (a file or a folder)."""
        path = Path(path)
        if path.is_dir():
            for name in ("config.json", "params.json"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise ConfigError(f"{path}: no config.json or params.json in this folder")
        elif not path.is_file():
            raise ConfigError(f"{path}: no such file or folder")
        data = read_json(path)
        if path.name == "params.json" or ("dim" in data and "n_layers" in data):
            return cls.from_mistral_params(data, source=str(path))
        return cls.from_hf_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> MixtralConfig:
        """Our own JSON form (``to_dict``); also accepts a Hugging Face config dict."""
        if "model_type" in data or "num_local_experts" in data:
            return cls.from_hf_dict(data, source=source)
        try:
            return cls(**_known(cls, data, source))
        except TypeError as exc:  # a wrong value type, e.g. a string for an int
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], source: str = "config.json") -> MixtralConfig:
        """A Hugging Face ``config.json`` of Mixtral, of one of the other families (``families``),
        or of our own variants (``model_type: mixtral_lite``)."""
        model_type = families.model_type_of(data, source)
        if model_type in families.READERS:
            return cls._build(families.READERS[model_type](data, source), source)
        if model_type == "mixtral_lite" and isinstance(data.get("mixtral_lite_config"), dict):
            return cls._build(dict(data["mixtral_lite_config"]), source)
        if model_type not in ("mixtral", "mixtral_lite"):
            others = ", ".join(repr(t) for t in (*families.READERS, "mixtral_lite"))
            raise ConfigError(f"{source}: model_type: expected 'mixtral' (or one of {others}), got {model_type!r}")
        rope_theta = data.get("rope_theta")
        rope_parameters = data.get("rope_parameters")
        if rope_theta is None and isinstance(rope_parameters, dict):
            rope_type = rope_parameters.get("rope_type", "default")
            if rope_type != "default":
                raise ConfigError(f"{source}: rope_parameters.rope_type: expected 'default', got {rope_type!r}")
            rope_theta = rope_parameters.get("rope_theta")
        for name in UNSUPPORTED_HF:
            if data.get(name) not in (None, {}, False):
                raise ConfigError(
                    f"{source}: {name}: {data[name]!r:.120} is not implemented by this model; refusing to run it "
                    "with different positions or attention than it was trained with (remove the field only if "
                    "it is truly unused)"
                )
        if rope_parameters is not None:
            if not isinstance(rope_parameters, dict):
                raise ConfigError(f"{source}: rope_parameters: expected an object, got {rope_parameters!r:.80}")
            rope_type = rope_parameters.get("rope_type", "default")
            if rope_type != "default":
                raise ConfigError(f"{source}: rope_parameters.rope_type: expected 'default', got {rope_type!r}")
        moe = data.get("mixtral_lite_moe") or {}
        if not isinstance(moe, dict):
            raise ConfigError(f"{source}: mixtral_lite_moe: expected an object, got {moe!r:.80}")
        moe = dict(moe)
        moe.setdefault("num_experts", data.get("num_local_experts", 8))
        moe.setdefault("num_experts_per_tok", data.get("num_experts_per_tok", 2))
        eos = data.get("eos_token_id", 2)
        if isinstance(eos, list):
            if not eos:
                raise ConfigError(f"{source}: eos_token_id: expected an id or a non-empty list of ids, got []")
            eos = eos[0]
        kwargs = {
            "vocab_size": data.get("vocab_size", 32000),
            "hidden_size": data.get("hidden_size", 4096),
            "intermediate_size": data.get("intermediate_size", 14336),
            "num_hidden_layers": data.get("num_hidden_layers", 32),
            "num_attention_heads": data.get("num_attention_heads", 32),
            "num_key_value_heads": data.get("num_key_value_heads") or data.get("num_attention_heads", 32),
            "head_dim": data.get("head_dim"),
            "rms_norm_eps": data.get("rms_norm_eps", 1e-5),
            "rope_theta": 1e6 if rope_theta is None else rope_theta,
            "max_position_embeddings": data.get("max_position_embeddings", 32768),
            "sliding_window": data.get("sliding_window"),
            "tie_word_embeddings": data.get("tie_word_embeddings", False),
            "bos_token_id": data.get("bos_token_id", 1),
            "eos_token_id": eos,
            "moe": moe,
        }
        return cls._build(kwargs, source)

    @classmethod
    def _build(cls, kwargs: dict[str, Any], source: str) -> MixtralConfig:
        try:
            return cls(**_known(cls, kwargs, source))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_mistral_params(cls, data: dict[str, Any], source: str = "params.json") -> MixtralConfig:
        missing = [k for k in ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size") if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {missing}")
        moe = data.get("moe")
        if not isinstance(moe, dict):
            raise ConfigError(f"{source}: moe: expected an object with num_experts, got {moe!r}")
        try:
            return cls(
                vocab_size=data["vocab_size"],
                hidden_size=data["dim"],
                intermediate_size=data["hidden_dim"],
                num_hidden_layers=data["n_layers"],
                num_attention_heads=data["n_heads"],
                num_key_value_heads=data.get("n_kv_heads", data["n_heads"]),
                head_dim=data.get("head_dim"),
                rms_norm_eps=data.get("norm_eps", 1e-5),
                rope_theta=data.get("rope_theta", 1e6),
                max_position_embeddings=data.get("max_seq_len", 32768),
                sliding_window=data.get("sliding_window"),
                moe={
                    "num_experts": moe.get("num_experts", 8),
                    "num_experts_per_tok": moe.get("num_experts_per_tok", 2),
                },
            )
        except (ConfigError, TypeError) as exc:
            raise ConfigError(f"{source}: {exc}") from None

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` that transformers' ``MixtralForCausalLM`` reads.

        Variant routers (anything but plain Mixtral) are written under ``mixtral_lite_moe`` with
        ``model_type: mixtral_lite``, so transformers refuses them instead of loading wrong weights.
        """
        plain = self.is_plain_mixtral
        data: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM"] if plain else ["MixtralLiteForCausalLM"],
            "model_type": "mixtral" if plain else "mixtral_lite",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "num_local_experts": self.moe.num_experts,
            "num_experts_per_tok": self.moe.num_experts_per_tok,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.02,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
        }
        if not plain:
            data["mixtral_lite_moe"] = dataclasses.asdict(self.moe)
        if self.family != "mixtral" or self.attention != AttentionConfig() or self.rope_scaling is not None:
            data["mixtral_lite_config"] = self.to_dict()  # every section, read back as it is
        return data


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (config.json, params.json, an index), or a ``ConfigError`` naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _known(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; expected some of {sorted(names)}")
    return dict(data)


# Settings of config.json that change the computation and that this model does not implement.
UNSUPPORTED_HF = ("rope_scaling", "attention_bias", "mlp_bias", "use_sliding_window_per_layer", "layer_types")
# Sane upper limits: a config beyond them is a mistake (or an attack), refused before anything is built.
LIMITS = {
    "vocab_size": 2**22,
    "hidden_size": 2**17,
    "intermediate_size": 2**20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 2**12,
    "num_key_value_heads": 2**12,
    "head_dim": 2**12,
    "max_position_embeddings": 2**24,
    "sliding_window": 2**24,
    "num_experts": 2**14,
    "num_experts_per_tok": 2**14,
    "num_groups": 2**14,
    "top_k_groups": 2**14,
    "n_shared_experts": 2**10,
    "n_group": 2**14,
    "topk_group": 2**14,
    "first_k_dense": 1024,
    "sparse_step": 1024,
    "group_score_topk": 2**14,
    "n_shared_intermediate": 2**22,
    "kv_lora_rank": 2**16,
    "q_lora_rank": 2**16,
    "qk_nope_head_dim": 2**12,
    "v_head_dim": 2**12,
    "original_max_position_embeddings": 2**24,
    "dense_intermediate_size": 2**22,
    "bos_token_id": 2**22,
    "eos_token_id": 2**22,
}


def _check_fields(obj: object) -> None:
    """Every field of its declared type (bools are not ints, strings are not numbers, floats are
    finite) and ints under ``LIMITS``, the field named in the message; before any other check."""
    prefix = _prefix(obj)
    for f in dataclasses.fields(obj):
        if f.name in SECTIONS:
            continue
        value, kind = getattr(obj, f.name), str(f.type)
        if value is None and "None" in kind:
            continue
        if kind.startswith("list[int]"):
            ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            if not ok:
                raise ConfigError(f"{prefix}{f.name}: expected a list of integers, got {value!r:.80}")
            continue
        if kind.startswith("bool"):
            ok, want = isinstance(value, bool), "true or false"
        elif kind.startswith("int"):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif kind.startswith("float"):
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        else:
            ok, want = isinstance(value, str), "a string"
        if not ok:
            raise ConfigError(f"{prefix}{f.name}: expected {want}, got {value!r:.80}")
        limit = LIMITS.get(f.name)
        if limit is not None and value is not None and value > limit:
            raise ConfigError(f"{prefix}{f.name}: {value} is above the limit of {limit}")


SECTIONS = ("moe", "attention", "rope_scaling")


def _prefix(obj: object) -> str:
    if isinstance(obj, MoEConfig):
        return "moe."
    if isinstance(obj, AttentionConfig):
        return "attention."
    return "rope_scaling." if isinstance(obj, RopeScaling) else ""


def _positive(obj: object, *names: str) -> None:
    prefix = _prefix(obj)
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{prefix}{name}: must be a positive integer, got {value!r}")
