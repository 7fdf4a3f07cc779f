"""Score a small local task with the lm-eval harness through `mixtral-lite serve`, and check that its
log-likelihoods are the model's own.

lm-eval's `local-completions` model sends each (context, continuation) pair as token ids with
`echo` and `logprobs` to /v1/completions and sums the continuation's log-probabilities. This
script starts the server on a free port of 127.0.0.1, writes a loglikelihood task over lines of
the bundled held-out Shakespeare (context: a line's first words; continuation: the rest), runs
`lm_eval.simple_evaluate`, then recomputes every sample with the model in this process (one
forward pass over the same tokens, float32) and prints the largest difference. Exit 1 when a
log-likelihood differs by more than --atol or a greedy flag differs.

    pip install 'mixtral-lite[lm-eval]'
    python scripts/lm_eval_check.py [--model DIR] [--docs 24]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = """task: mixtral_lite_heldout
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path, docs: int) -> None:
    lines = [ln.strip() for ln in (ROOT / "mixtral_lite/bundled/heldout.txt").read_text().splitlines()]
    lines = [ln for ln in lines if len(ln.split()) >= 6][:docs]
    data = folder / "docs.jsonl"
    with data.open("w") as f:
        for ln in lines:
            words = ln.split()
            cut = len(words) // 2
            f.write(json.dumps({"context": " ".join(words[:cut]), "continuation": " " + " ".join(words[cut:])}) + "\n")
    (folder / "task.yaml").write_text(TASK.format(data=data))


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "mixtral_lite", "serve", "--model", str(model), "--port", "0", "--threads", "1",
           "--dtype", "float32"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit(f"the server did not start (exit {proc.wait()})")
        if "http://127.0.0.1:" in line:
            return proc, line.split(" at ")[1].split()[0]


def reference(model_dir: Path, samples: list[dict]) -> list[tuple[float, bool]]:
    """Each sample's (log-likelihood, is_greedy) from the model in this process, on lm-eval's tokens."""
    import torch
    from transformers import AutoTokenizer

    from mixtral_lite import load_model

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, dtype=torch.float32)
    out = []
    for s in samples:
        args = s["arguments"]
        context, continuation = (args[0] if isinstance(args[0], list | tuple) else args)[:2]
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        enc = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731 (lm-eval's tok_encode)
        whole, ctx = enc(context + continuation), enc(context)
        cont = whole[len(ctx) :]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = model(ids)[0].float().log_softmax(-1)
        rows = logp[len(ctx) - 1 : -1]
        target = torch.tensor(cont)
        out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "mixtral_lite/bundled"))
    p.add_argument("--docs", type=int, default=24)
    p.add_argument("--atol", type=float, default=1e-3, help="largest allowed difference of a sample's log-likelihood")
    args = p.parse_args(argv)
    import lm_eval
    from lm_eval.tasks import TaskManager

    model_dir = Path(args.model).resolve()
    proc, url = start_server(model_dir)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_task(Path(tmp), args.docs)
            model_args = (f"model=bundled,base_url={url}/completions,tokenizer_backend=huggingface,"
                          f"tokenizer={model_dir},tokenized_requests=True,num_concurrent=4,max_retries=1")  # fmt: skip
            result = lm_eval.simple_evaluate(
                model="local-completions",
                model_args=model_args,
                tasks=["mixtral_lite_heldout"],
                task_manager=TaskManager(include_path=tmp),
                log_samples=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    samples = result["samples"]["mixtral_lite_heldout"]
    theirs = [tuple(s["resps"][0][0]) for s in samples]
    ours = reference(model_dir, samples)
    diff = max(abs(a[0] - b[0]) for a, b in zip(theirs, ours, strict=True))
    greedy_same = all(a[1] == b[1] for a, b in zip(theirs, ours, strict=True))
    metrics = result["results"]["mixtral_lite_heldout"]
    print(f"lm-eval local-completions: {len(samples)} samples, {json.dumps(metrics, default=str)}")
    print(f"log-likelihood vs the model's own: max abs difference {diff:.2e}; greedy flags equal: {greedy_same}")
    return 0 if diff <= args.atol and greedy_same else 1


if __name__ == "__main__":
    sys.exit(main())
