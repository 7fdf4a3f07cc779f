"""The benchmark table: ours, transformers and the speedup; the roofline; int8."""

from __future__ import annotations


def fmt_check(check: dict) -> str:
    parts = []
    for key, c in check.items():
        state = "identical" if c["identical"] else f"{c['agree']:.1%} agree, first mismatch at {c['first_mismatch']}"
        parts.append(f"{key} {state}")
    return "; ".join(parts)


_ROWS = [
    # (label, key, higher is better, format)
    ("prefill {prompt_len} (tok/s)", "prefill_tok_s", True, "{:.1f}"),
    ("decode b1 (tok/s)", "decode_b1_tok_s", True, "{:.1f}"),
    ("decode b{batch} (tok/s)", "decode_bn_tok_s", True, "{:.1f}"),
    ("time to first token (s)", "ttft_s", False, "{:.3f}"),
    ("peak memory (MB)", "peak_mem_mb", False, "{:.0f}"),
    ("load time (s)", "load_s", False, "{:.2f}"),
]


def format_table(result: dict) -> str:
    """The comparison table: ours, theirs and the speedup (ours/theirs for rates, theirs/ours for
    times and memory, so above 1 always means ours is better)."""
    opts, mach = result["options"], result["machine"]
    lines = [
        f"mixtral_lite vs transformers {mach.get('transformers', '?')} on the same weights: preset {opts['preset']}, "
        f"{mach['device']} ({mach['cpu']}, {mach['cpu_capability']}), {mach['threads']} threads, torch {mach['torch']}",
        f"few-row CPU kernel (native.py): {mach.get('native_kernel', '?')}",
        f"median of {opts['repeats']}; decode: {opts['new_tokens']} greedy tokens after a "
        f"{opts['decode_prompt_len']}-token prompt; 'better' > 1 means mixtral_lite is better",
        "",
    ]
    header = ("dtype", "metric", "mixtral_lite", "transformers", "better")
    rows = [header]
    for dname, entry in result["dtypes"].items():
        ours, theirs = entry["ours"], entry.get("theirs")
        for n, (label, key, higher, fmt) in enumerate(_ROWS):
            a = ours[key]
            b = theirs[key] if theirs else None
            ratio = "" if b is None or not a or not b else f"{(a / b if higher else b / a):.2f}x"
            rows.append(
                (
                    dname if n == 0 else "",
                    label.format(**opts),
                    fmt.format(a),
                    "" if b is None else fmt.format(b),
                    ratio,
                )
            )
        if "ours_compiled" in entry:  # against transformers' eager decode (it has no CPU compile path)
            c = entry["ours_compiled"]
            for label, key in (("decode b1", "decode_b1_tok_s"), (f"decode b{opts['batch']}", "decode_bn_tok_s")):
                b = theirs[key] if theirs else None
                cells = ("", "") if b is None else (f"{b:.1f}", f"{c[key] / b:.2f}x")
                rows.append(("", f"{label}, --compile (tok/s)", f"{c[key]:.1f}", *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for j, r in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells))
        if j == 0:
            lines.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
    lines.append("")
    lines.extend(_roofline_lines(result))
    for dname, entry in result["dtypes"].items():
        if "int8" in entry:
            lines.extend(_int8_lines(dname, entry, opts))
        if "same_tokens" in entry:
            lines.append(f"greedy tokens vs transformers ({dname}): {fmt_check(entry['same_tokens'])}")
        if entry.get("theirs"):
            ch = entry["theirs"]["detail"]["choice"]
            lines.append(
                f"transformers configuration used ({dname}): prefill {ch['prefill']}, decode b1 {ch['decode_b1']}, "
                f"decode b{opts['batch']} {ch['decode_bn']} (experts implementation / cache)"
            )
    return "\n".join(lines)


def _roofline_lines(result: dict) -> list[str]:
    bw = result["bandwidth_GBps"]
    lines = [
        f"decode roofline at batch 1: {bw:.1f} GB/s read bandwidth (best of the samples taken during the run) "
        "/ bytes of active weights per token"
    ]
    for dname, entry in result["dtypes"].items():
        roof = entry["roofline_tok_s"]
        ours = entry["ours"]["decode_b1_tok_s"]
        lines.append(
            f"  {dname}: {entry['bytes_per_token'] / 1e6:.1f} MB/token -> {roof:.1f} tok/s; "
            f"mixtral_lite {ours:.1f} tok/s = {ours / roof:.0%} of it"
        )
        if "ours_compiled" in entry:
            c = entry["ours_compiled"]["decode_b1_tok_s"]
            lines.append(f"  {dname}, --compile: mixtral_lite {c:.1f} tok/s = {c / roof:.0%} of it")
        if "int8" in entry:
            r8, o8 = entry["int8_roofline_tok_s"], entry["int8"]["decode_b1_tok_s"]
            lines.append(
                f"  int8: {entry['int8_bytes_per_token'] / 1e6:.1f} MB/token -> {r8:.1f} tok/s; "
                f"mixtral_lite {o8:.1f} tok/s = {o8 / r8:.0%} of it"
            )
        if "int8_compiled" in entry:
            c8 = entry["int8_compiled"]["decode_b1_tok_s"]
            r8 = entry["int8_roofline_tok_s"]
            lines.append(f"  int8, --compile: mixtral_lite {c8:.1f} tok/s = {c8 / r8:.0%} of it")
    return lines


def _int8_lines(dname: str, entry: dict, opts: dict) -> list[str]:
    q, ours, qual = entry["int8"], entry["ours"], entry["int8_quality"]
    lines = [
        f"int8 weights ({dname} activations): decode b1 {q['decode_b1_tok_s']:.1f} tok/s = "
        f"{q['decode_b1_tok_s'] / ours['decode_b1_tok_s']:.2f}x our {dname}; decode b{opts['batch']} "
        f"{q['decode_bn_tok_s']:.1f} tok/s; prefill {q['prefill_tok_s']:.1f} tok/s",
    ]
    if "int8_compiled" in entry and "ours_compiled" in entry:
        qc, oc = entry["int8_compiled"], entry["ours_compiled"]
        lines.append(
            f"  --compile: int8 decode b1 {qc['decode_b1_tok_s']:.1f} tok/s = "
            f"{qc['decode_b1_tok_s'] / oc['decode_b1_tok_s']:.2f}x our compiled {dname}; decode b{opts['batch']} "
            f"{qc['decode_bn_tok_s']:.1f} tok/s"
        )
    return lines + [
        f"  weights {ours['weights_mb']:.0f} MB -> {q['weights_mb']:.0f} MB "
        f"(saved {ours['weights_mb'] - q['weights_mb']:.0f} MB, {1 - q['weights_mb'] / ours['weights_mb']:.0%})",
        f"  quality vs {dname}: greedy agreement over {opts['new_tokens']} tokens {qual['greedy_agree_free']:.1%} "
        f"free-running (first mismatch: {qual['greedy_first_mismatch']}), {qual['greedy_agree_forced']:.1%} "
        f"teacher-forced; logits max abs err {qual['logit_max_abs_err']:.3g} "
        f"(logit rms {qual['logit_scale_rms']:.3g}), relative err {qual['logit_rel_err']:.2%}",
    ]
