"""CUDA check for the gateway (< 2 min): serve a LoRA version of SmolLM2 on the GPU, send concurrent
requests through the official OpenAI client, and print tokens/s at 1 and 16 clients.

    python scripts/device_check_serve.py [--base smollm2-135m-instruct|/path/to/hf-folder] [--clients 16]
    python scripts/device_check_serve.py --engine-only --tokenizer DIR   # no MLflow/FastAPI/openai needed

The full check needs the project's dependencies (MLflow, FastAPI, uvicorn, pydantic-settings, openai) and the
base model. `--engine-only` needs only torch, transformers, peft and prometheus-client (what the lent GPU image
has): it builds a random model of the base's shape from DIR (config.json + tokenizer files, e.g. a copy of
~/.cache/tuneops/models/smollm2-135m-instruct without its weights), two random LoRA adapters, and checks mixed-
adapter batches, seeded sampling and decode tokens/s at 1-64 rows.
Exit status 0 when every request succeeded on CUDA, 1 on a failure, 2 when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--engine-only", action="store_true", help="check the engine without the HTTP gateway")
    parser.add_argument("--tokenizer", type=Path, help="with --engine-only: folder with config.json and tokenizer")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 2
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    if args.engine_only:
        return engine_only(args.tokenizer, args.max_tokens)

    import mlflow
    from peft import LoraConfig, get_peft_model

    from core.aliases import move_alias
    from core.models import load_causal_lm, load_tokenizer, resolve_base_model
    from core.pyfunc import publish_version, write_bundle
    from core.registry import PRODUCTION, Manifest, connect
    from serve.server import configure_logging, make_server
    from serve.settings import ServeSettings

    work = Path(tempfile.mkdtemp(prefix="tuneops-devcheck-"))
    os.chdir(work)
    base = resolve_base_model(args.base)
    tok = load_tokenizer(base)
    model = get_peft_model(
        load_causal_lm(base, torch.device("cpu"), torch.float32),
        LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    manifest = Manifest(
        base_model=args.base if not Path(args.base).exists() else str(base.path),
        base_digest=base.digest,
        chat_template=tok.chat_template,
        eos_token=tok.eos_token,
    )
    bundle = write_bundle(work / "bundle", model, tok, manifest)
    uri = f"sqlite:///{work}/mlflow.db"
    client = connect(uri)
    mlflow.set_experiment("device-check")
    with mlflow.start_run():
        mv = publish_version(bundle, "check-model", pip_requirements=["torch"])
    move_alias(client, "check-model", PRODUCTION, str(mv.version), "device check")

    configure_logging()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(
        models=["check-model"],
        tracking_uri=uri,
        device="cuda",
        port=port,
        limits={"max_batch_size": 32, "max_queue": 64, "max_tokens": 512},
    )
    server = make_server(settings)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    import httpx
    from openai import OpenAI

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        print("gateway not ready within 90 s")
        return 1
    gateway = server.config.app.state.gateway
    print(f"engine device: {gateway.engine.device}, dtype: {gateway.engine.base.dtype}")
    api = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    questions = [
        "How do I renew my passport?",
        "What is a building permit?",
        "When is trash collected?",
        "How do I pay a parking fine?",
    ]

    def ask(i: int) -> int:
        out = api.chat.completions.create(
            model="check-model",
            max_tokens=args.max_tokens,
            temperature=0,
            messages=[{"role": "user", "content": questions[i % len(questions)]}],
        )
        return out.usage.completion_tokens

    failures = 0
    for clients in (1, args.clients):
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            futures = [pool.submit(ask, i) for i in range(clients * 2)]
        tokens = 0
        for f in futures:
            try:
                tokens += f.result()
            except Exception as exc:
                failures += 1
                print(f"request failed: {exc}")
        wall = time.perf_counter() - start
        print(f"{clients:>3} clients: {tokens} tokens in {wall:.2f} s = {tokens / wall:.1f} tok/s")
    server.should_exit = True
    thread.join(30)
    print("OK" if failures == 0 else f"{failures} failures")
    return 0 if failures == 0 else 1


def engine_only(folder: Path | None, max_tokens: int) -> int:
    """The batching engine on CUDA with a random model of the base's shape: correctness and tokens/s."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from serve.engine import Engine, Failed, Finished, Job, SamplingParams, TextDelta
    from serve.metrics import Metrics

    if folder is None:
        from core.models import cache_dir

        folder = cache_dir() / "models" / "smollm2-135m-instruct"
    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    config = AutoConfig.from_pretrained(folder)
    work = Path(tempfile.mkdtemp(prefix="tuneops-devcheck-"))
    for seed in (0, 1):
        torch.manual_seed(seed)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_config(config), lora).save_pretrained(work / f"a{seed}")
    torch.manual_seed(0)
    device = torch.device("cuda")
    base = AutoModelForCausalLM.from_config(config).to(device, torch.bfloat16).eval()
    engine = Engine(max_batch=64, max_queue=128, queue_timeout_s=600, metrics=Metrics())
    engine.start()
    engine.call(lambda: engine.load_base(base, tok, device)).result()
    for name in ("a0", "a1"):
        engine.call(lambda n=name: engine.add_adapter(n, work / n)).result()
    failures = 0

    def run(specs: list[tuple[str, str, float, int | None]], n_tokens: int = 32) -> list[str]:
        nonlocal failures
        out: dict[int, str] = {}
        done = threading.Semaphore(0)
        for i, (adapter, prompt, temperature, seed) in enumerate(specs):

            def sink(event: object, i: int = i) -> None:
                nonlocal failures
                if isinstance(event, TextDelta | Finished):
                    out[i] = out.get(i, "") + event.text
                if isinstance(event, Failed):
                    failures += 1
                if isinstance(event, Finished | Failed):
                    done.release()

            ids = tok(
                tok.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
            params = SamplingParams(max_tokens=n_tokens, temperature=temperature, seed=seed)
            engine.submit(Job(adapter, list(ids), params, frozenset(), sink), 1)
        for _ in specs:
            done.acquire()
        return [out.get(i, "") for i in range(len(specs))]

    specs = [
        ("a0", "Hello there", 0.0, None),
        ("a1", "What is the capital of France?", 0.0, None),
        ("a0", "Tell me a story", 0.0, None),
    ]
    alone = [run([s])[0] for s in specs]
    print(
        "mixed-adapter batch equals single requests (bf16 may differ):",
        [a == b for a, b in zip(alone, run(specs), strict=True)],
    )
    print("seeded sampling repeats:", run([("a0", "Hello", 0.8, 7)]) == run([("a0", "Hello", 0.8, 7)]))
    for rows in (1, 16, 32, 64):
        batch = [
            ("a0" if i % 2 else "a1", f"Question {i}: how do I renew my passport?", 0.0, None) for i in range(rows)
        ]
        run(batch[:2], 8)
        start = time.perf_counter()
        run(batch, max_tokens)
        wall = time.perf_counter() - start
        print(f"{rows:>3} rows, mixed adapters: {rows * max_tokens / wall:8.1f} tok/s")
    engine.stop()
    print("OK" if failures == 0 else f"{failures} failures")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
