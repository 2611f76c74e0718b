"""Batch inference benchmark: `tuneops predict` (the gateway's batching engine, no HTTP) against a loop of
single `generate` calls, on a registered LoRA version of SmolLM2-135M-Instruct.

The version is a LoRA with small random weights (bench_serve.py registers it); the engine runs it merged into
the weights and the generate loop through peft, so a few greedy answers may differ by rounding (counted).
Reported per target: rows, generated tokens, seconds, rows/s, tokens/s, and how many rows answer exactly as
the generate loop does. Run it on a quiet machine; the figures belong in docs/benchmarks.md.

    .venv/bin/python scripts/bench_predict.py [--rows 64] [--max-tokens 64] [--batch-sizes 1 8 32] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

from bench_serve import MODEL_NAME, QUESTIONS, register_versions  # noqa: E402 (scripts/ is on sys.path)


def write_input(path: Path, rows: int) -> list[dict]:
    items = [
        {"id": i, "messages": [{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (case {i})"}]}
        for i in range(rows)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return items


def generate_loop(uri: str, items: list[dict], max_tokens: int, dtype: str, work: Path) -> tuple[dict, list[str]]:
    """One `generate` call per row on the same version (PeftModel, greedy, the version's chat and EOS)."""
    import torch

    from core.chat import prompt_ids
    from core.device import choose_device, choose_dtype
    from core.registry import connect
    from core.version import open_version

    opened = open_version(connect(uri), MODEL_NAME, work / "generate-version")
    device = choose_device("auto")
    model = opened.attach(opened.load_base(device, choose_dtype(dtype, device)).eval(), "version").eval()  # type: ignore[arg-type]
    tokenizer = opened.tokenizer()
    eos = opened.eos_ids(tokenizer)
    texts, tokens = [], 0
    with torch.inference_mode():  # one untimed call: first-call set-up is not throughput
        model.generate(input_ids=torch.tensor([[eos[0]]], device=device), max_new_tokens=2, pad_token_id=eos[0])
    start = time.perf_counter()
    with torch.inference_mode():
        for item in items:
            ids = prompt_ids(tokenizer, item["messages"], opened.manifest.chat_template, opened.manifest.system_prompt)
            out = model.generate(
                input_ids=torch.tensor([ids], device=device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos[0],
            )
            new = out[0, len(ids) :].tolist()
            if new and new[-1] in eos:
                new = new[:-1]
                tokens += 1
            tokens += len(new)
            texts.append(tokenizer.decode(new, skip_special_tokens=True))
    seconds = time.perf_counter() - start
    return {"target": "generate loop", "rows": len(items), "tokens": tokens, "seconds": seconds}, texts


def run_predict(uri: str, source: Path, batch: int, max_tokens: int, dtype: str, work: Path) -> tuple[dict, list[str]]:
    from tuneops.predict import PredictOptions, predict

    out = work / f"answers-{batch}.jsonl"
    options = PredictOptions(max_tokens=max_tokens, temperature=0.0, batch_size=batch, dtype=dtype)
    report = predict(MODEL_NAME, source, out, options, uri, progress=False)
    texts = [json.loads(line)["output"] for line in out.read_text().splitlines()]
    row = {"target": f"predict batch {batch}", "rows": report.rows, "tokens": report.completion_tokens}
    return row | {"seconds": report.seconds}, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        work = Path(tmp)
        uri = register_versions(work)
        source = work / "questions.jsonl"
        items = write_input(source, args.rows)
        baseline, reference = generate_loop(uri, items, args.max_tokens, args.dtype, work)
        results = [baseline | {"same_as_generate": len(items)}]
        for batch in args.batch_sizes:
            row, texts = run_predict(uri, source, batch, args.max_tokens, args.dtype, work)
            results.append(row | {"same_as_generate": sum(a == b for a, b in zip(texts, reference, strict=True))})

    print(f"torch threads: {torch.get_num_threads()}")
    print("| target | rows | tokens | seconds | rows/s | tokens/s | same as generate |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        r["rows_per_s"], r["tokens_per_s"] = r["rows"] / r["seconds"], r["tokens"] / r["seconds"]
        print(
            f"| {r['target']} | {r['rows']} | {r['tokens']} | {r['seconds']:.1f} | {r['rows_per_s']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['same_as_generate']}/{r['rows']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
