"""`make monitor-demo`: the loop from serving back to training, on the embedded default.

1. Makes sure the job's model has a `production` version (runs `tuneops pipeline JOB` when it has none).
2. Serves it (`tuneops serve`, traffic captured as MLflow traces) and asks it, through the official `openai`
   client, held-out questions of the FAQ it was trained on and questions of another domain (an IT helpdesk's).
3. Rates the answers over HTTP (`POST /v1/feedback`): most FAQ answers good, a few bad; the off-domain
   answers bad, each with a correction that says what the assistant is for.
4. Stops the gateway (it writes the queued traces on the way out) and runs
   `tuneops monitor MODEL --since 1h --config JOB --retrain RETRAIN_JOB`: drift and feedback checks fail, so
   the next version is trained on the job's data plus the rated answers (`configs/retrain.yaml`: a few steps
   from production's adapter), gated against production, and promoted when its gates pass. Ends with
   `tuneops history MODEL`.

    python scripts/monitor_demo.py [--job configs/default.yaml] [--retrain-job configs/retrain.yaml]
                                   [--faq 24] [--other 16]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OTHER_DOMAIN = ROOT / "tests" / "data" / "it_helpdesk_questions.jsonl"
DECLINE = (
    "I can only help with questions about Zaragoza AB's building and renovation work. "
    "For computer and account problems, please contact your IT helpdesk."
)


def tuneops(*args: str, check: bool = True) -> int:
    cmd = [sys.executable, "-m", "tuneops", *args]
    print("$ tuneops " + " ".join(args), flush=True)
    code = subprocess.run(cmd, cwd=ROOT, check=False).returncode
    if check and code != 0:
        sys.exit(f"tuneops {args[0]} exited {code}")
    return code


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def faq_questions(n: int, seed: int) -> list[tuple[str, str]]:
    """(question, reference answer) pairs of the embedded FAQ, a seeded sample."""
    from finetune.data import resolve_path

    rows = [json.loads(line) for line in resolve_path(Path("builtin:zaragoza-faq")).read_text().splitlines() if line]
    random.Random(seed).shuffle(rows)
    return [(r["instruction"], r["output"]) for r in rows[:n]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument(
        "--retrain-job", type=Path, default=ROOT / "configs" / "retrain.yaml", help="job the retrain runs"
    )
    parser.add_argument("--faq", type=int, default=24, help="FAQ questions to ask")
    parser.add_argument("--other", type=int, default=16, help="off-domain questions to ask")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    begun = time.monotonic()

    import httpx
    from openai import OpenAI

    from core.config import load_config
    from core.registry import PRODUCTION, connect, current_alias
    from core.schema.job import JobConfig

    cfg = load_config(JobConfig, args.job, [])
    model = cfg.registry.model_name
    if current_alias(connect(cfg.tracking.tracking_uri), model, PRODUCTION) is None:
        print(f"{model} has no production version yet: running the pipeline first", flush=True)
        tuneops("pipeline", str(args.job))

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, **({"MLFLOW_TRACKING_URI": cfg.tracking.tracking_uri} if cfg.tracking.tracking_uri else {})}
    print(f"$ tuneops serve {model} --port {port}", flush=True)
    gateway = subprocess.Popen(
        [sys.executable, "-m", "tuneops", "serve", model, "--port", str(port)], cwd=ROOT, env=env
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if gateway.poll() is not None or time.monotonic() > deadline:
                sys.exit("the gateway did not become ready")
            time.sleep(1)

        client = OpenAI(base_url=f"{base}/v1", api_key="unused")
        faq = faq_questions(args.faq, seed=7)
        other = [json.loads(line)["prompt"] for line in OTHER_DOMAIN.read_text().splitlines() if line][: args.other]
        rated = {"good": 0, "bad": 0, "corrected": 0}
        for i, (question, reference) in enumerate([*faq, *((q, None) for q in other)]):
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=args.max_tokens,
                temperature=0,
            )
            answer = reply.choices[0].message.content or ""
            print(f"[{i + 1}] {question}\n    -> {answer[:100]!r}", flush=True)
            if reference is None:
                body: dict = {"completion_id": reply.id, "rating": "bad", "correction": DECLINE}
                rated["corrected"] += 1
            elif i % 4 == 3:
                body = {"completion_id": reply.id, "rating": 2, "comment": "see the FAQ"}
                rated["bad"] += 1
            else:
                body = {"completion_id": reply.id, "rating": "good" if i % 2 else 5}
                rated["good"] += 1
            httpx.post(f"{base}/v1/feedback", json=body, timeout=60).raise_for_status()
        print(f"rated: {rated}", flush=True)
    finally:
        gateway.send_signal(signal.SIGINT)  # a graceful stop writes the traces still queued
        try:
            gateway.wait(timeout=120)
        except subprocess.TimeoutExpired:
            gateway.kill()

    started = time.monotonic()
    code = tuneops(
        "monitor", model, "--since", "1h", "--config", str(args.job), "--retrain", str(args.retrain_job), check=False
    )
    print(
        f"tuneops monitor exited {code} after {time.monotonic() - started:.0f} s "
        "(1: a check failed, which is what triggered the retrain)",
        flush=True,
    )
    tuneops("history", model)
    print(f"monitor demo: {time.monotonic() - begun:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
