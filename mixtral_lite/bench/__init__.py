"""Benchmark mixtral_lite against transformers' ``MixtralForCausalLM`` on the same weights.

One random-weight checkpoint is written by transformers and loaded into both models, in the same
dtype, on the same device, with the same thread count, in the same process. Every number is the
median of ``repeats`` runs. Greedy tokens are compared before any speed is reported, so speed is
never bought with a different answer.

Metrics, per dtype: prefill tokens/s (one forward pass over a ``prompt_len`` prompt, filling the
cache), decode tokens/s at batch 1 and at batch ``batch`` (``new_tokens`` greedy tokens after a
``decode_prompt_len`` prompt; the first token is prefill's and not counted), time to first token
(call to first token on the host, for the ``prompt_len`` prompt), peak memory (weights plus the
largest transient of a run), load time (checkpoint folder to a ready model). transformers runs
its own ``generate`` with every experts implementation and cache kind listed, and is credited
with the fastest of them on each metric.

The decode roofline: batch-1 decoding reads every active weight once per token, so tokens/s can
not exceed (measured memory read bandwidth) / (bytes of active weights). "Active" weights are
attention, norms, router, the top-k experts of every layer, the output head in full and one row
of the embedding table.

Axis legend: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

from .checkpoint import make_checkpoint
from .engines import Ours, Theirs
from .hardware import active_weight_bytes, machine_info, measure_bandwidth
from .options import Options, add_arguments, options_from_args
from .report import format_table
from .run import run_benchmark

__all__ = [
    "Options",
    "Ours",
    "Theirs",
    "active_weight_bytes",
    "add_arguments",
    "format_table",
    "machine_info",
    "make_checkpoint",
    "measure_bandwidth",
    "options_from_args",
    "run_benchmark",
]
