"""Serving benchmark: N concurrent OpenAI clients (1, 4, 16) against the tuneops gateway and its baselines.

Targets, run one after another on the same model (SmolLM2-135M-Instruct, in the dtype core.device picks):
  gateway      `tuneops serve` on version 1 of a registered LoRA model (alias production)
  mixed        the same gateway, half the clients on version 1 and half on version 2 (alias candidate)
  no-capture   the gateway with traffic capture off (`capture.enabled: false`): what capturing costs
  unpacked     the gateway with `pack_weights: false`: plain `F.linear` weights, what packing gains
  serial       the same gateway with max_batch_size=1: one request at a time
  hf-serve     `transformers serve --continuous-batching` on version 1 merged into the base (a plain folder)
  in-process   PeftModel.generate in this process, 1 client (no HTTP), the single-stream reference
The versions are LoRA adapters with small random weights: real deltas on every linear layer that keep the
answers close to the base's. Each client sends the same fixed chat requests (temperature 0, max_tokens fixed)
and streams them; reported: TTFT, inter-token latency and e2e latency (p50/p99), output tokens/s over the
whole run (completion tokens as each server counts them), failures, and the load average before each target.
Ratios against hf-serve (and mixed against gateway) are printed only when every load average before a run
was at most --max-load: figures taken beside other work are not figures.

    .venv/bin/python scripts/bench_serve.py [--clients 1 16] [--max-tokens 128] [--targets ...] [--json out]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "How do I apply for a building permit?",
    "What documents do I need to renew my passport?",
    "When is the recycling collected in my street?",
    "How can I pay a parking fine online?",
    "What are the opening hours of the town hall?",
    "How do I register a newborn child?",
    "Can I get a refund for an unused bus pass?",
    "How do I report a broken street light?",
]
MODEL_NAME = "bench-model"


@dataclass
class Sample:
    ttft: float
    itl: list[float]
    e2e: float
    tokens: int


@dataclass
class Result:
    target: str
    clients: int
    wall: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    failures: int = 0
    load: float = field(default_factory=lambda: os.getloadavg()[0])  # 1-minute load average before the run

    def row(self) -> dict:
        def pct(values: list[float], q: float) -> float:
            if not values:
                return float("nan")
            values = sorted(values)
            return values[min(len(values) - 1, round(q * (len(values) - 1)))]

        ttft = [s.ttft for s in self.samples]
        itl = [x for s in self.samples for x in s.itl]
        e2e = [s.e2e for s in self.samples]
        tokens = sum(s.tokens for s in self.samples)
        return {
            "target": self.target,
            "clients": self.clients,
            "requests": len(self.samples),
            "failures": self.failures,
            "tok_s": tokens / self.wall if self.wall else 0.0,
            "ttft_p50": pct(ttft, 0.5),
            "ttft_p99": pct(ttft, 0.99),
            "itl_p50": pct(itl, 0.5),
            "itl_p99": pct(itl, 0.99),
            "e2e_p50": pct(e2e, 0.5),
            "e2e_p99": pct(e2e, 0.99),
            "mean_tokens": tokens / len(self.samples) if self.samples else 0.0,
            "load_before": self.load,
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def one_request(client, model: str, question: str, max_tokens: int) -> Sample:
    start = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if getattr(chunk, "usage", None):
            usage_tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    if not stamps:
        raise RuntimeError("no content")
    return Sample(
        stamps[0] - start,
        [b - a for a, b in itertools.pairwise(stamps)],
        end - start,
        usage_tokens if usage_tokens is not None else len(stamps),
    )


async def load(base_url: str, models: list[str], target: str, clients: int, requests: int, max_tokens: int) -> Result:
    """`clients` workers share `requests` requests; worker i asks `models[i % len(models)]`."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    result = Result(target, clients)
    queue = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]

    async def worker(model: str) -> None:
        while queue:
            question = queue.pop()
            try:
                result.samples.append(await one_request(client, model, question, max_tokens))
            except Exception as exc:
                result.failures += 1
                print(f"  failure ({target}): {type(exc).__name__}: {exc}", file=sys.stderr)

    for model in models:
        await one_request(client, model, QUESTIONS[0], 4)  # warm the connection and the server
    start = time.perf_counter()
    await asyncio.gather(*(worker(models[i % len(models)]) for i in range(clients)))
    result.wall = time.perf_counter() - start
    await client.close()
    return result


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def register_versions(work: Path) -> str:
    """Versions 1 (production) and 2 (candidate) of a LoRA model in a fresh MLflow store, and version 1 merged
    into a plain model folder (`work/merged`) for the peer; returns the tracking URI."""
    import mlflow
    import torch
    from peft import LoraConfig, get_peft_model

    from core.aliases import move_alias
    from core.models import load_causal_lm, load_tokenizer, resolve_base_model
    from core.pyfunc import publish_version, write_bundle
    from core.registry import PRODUCTION, Manifest, connect

    base = resolve_base_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(base)
    uri = f"sqlite:///{work}/mlflow.db"
    os.chdir(work)
    client = connect(uri)
    mlflow.set_experiment("bench")
    manifest = Manifest(
        base_model=base.name,
        base_digest=base.digest,
        chat_template=tokenizer.chat_template,
        eos_token=tokenizer.eos_token,
        job_name="bench",
    )
    for seed, alias in ((1, PRODUCTION), (2, "candidate")):
        model = get_peft_model(
            load_causal_lm(base, torch.device("cpu"), torch.float32),
            LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        )
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 1e-3)
        bundle = write_bundle(work / f"bundle-{seed}", model, tokenizer, manifest)
        with mlflow.start_run():
            mv = publish_version(bundle, MODEL_NAME, pip_requirements=["torch"])
        move_alias(client, MODEL_NAME, alias, str(mv.version), "benchmark")
        if seed == 1:
            merged = model.merge_and_unload()
            merged.save_pretrained(work / "merged")
            tokenizer.save_pretrained(work / "merged")
    return uri


def serve_dtype() -> str:
    from core.device import choose_device, choose_dtype, dtype_name

    return dtype_name(choose_dtype("auto", choose_device("auto")))


def cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def start_gateway(
    uri: str, port: int, max_batch: int, work: Path, threads: int, capture: bool = True, pack: bool = True
) -> subprocess.Popen:
    """`tuneops serve --config` through the real CLI command (tuneops/commands/serving.py)."""
    config = work / f"serve-{port}.yaml"
    config.write_text(
        json.dumps(
            {
                "models": [MODEL_NAME],
                "tracking_uri": uri,
                "port": port,
                "poll_interval_s": 60,
                "capture": {"enabled": capture},
                "cpu_threads": threads,
                "pack_weights": pack,
                "limits": {
                    "max_batch_size": max_batch,
                    "max_queue": 256,
                    "queue_timeout_s": 600,
                    "max_tokens": 1024,
                },
            }
        )
    )
    code = f"from tuneops.cli import app; app(['serve', '--config', {str(config)!r}])"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(work / f"gateway-{port}.log").open("w"),
    )


def start_hf_serve(port: int, work: Path, threads: int, cb_args: list[str]) -> tuple[subprocess.Popen, str]:
    path = str(work / "merged")
    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(serve_dtype(), "float32")
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
    proc = subprocess.Popen(
        [
            exe,
            "serve",
            path,
            "--continuous-batching",
            "--device",
            "cpu",
            "--dtype",
            dtype,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            *cb_args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=(work / "hf-serve.log").open("w"),
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    return proc, path


def in_process(max_tokens: int, requests: int, threads: int) -> Result:
    """One stream at a time with PeftModel.generate, timing each token through a streamer."""
    import torch
    from peft import PeftModel
    from transformers.generation.streamers import BaseStreamer

    from core.chat import prompt_ids
    from core.device import choose_device, choose_dtype
    from core.models import load_causal_lm, load_tokenizer, resolve_base_model

    torch.set_num_threads(threads)
    base = resolve_base_model("smollm2-135m-instruct")
    device = choose_device("auto")
    tok = load_tokenizer(base)
    model = load_causal_lm(base, device, choose_dtype("auto", device))
    bench = Path(os.getcwd()) / "bundle-1" / "adapter"
    model = PeftModel.from_pretrained(model, bench, autocast_adapter_dtype=False).to(model.dtype).eval()

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.stamps.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    result = Result("in-process", 1)
    start_all = time.perf_counter()
    for i in range(requests + 1):
        ids = torch.tensor(
            [prompt_ids(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])], device=device
        )
        clock = Clock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                streamer=clock,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        end = time.perf_counter()
        if i == 0:  # warm-up
            start_all = time.perf_counter()
            continue
        n = out.shape[1] - ids.shape[1]
        s = clock.stamps
        result.samples.append(Sample(s[0] - start, [b - a for a, b in itertools.pairwise(s)], end - start, n))
    result.wall = time.perf_counter() - start_all
    return result


def table(rows: list[dict]) -> str:
    head = (
        "| target | clients | requests | failures | output tok/s | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) "
        "| e2e p50 / p99 (s) | mean tokens | load before |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['clients']} | {r['requests']} | {r['failures']} | {r['tok_s']:.1f} | "
            f"{r['ttft_p50']:.3f} / {r['ttft_p99']:.3f} | {r['itl_p50'] * 1e3:.1f} / "
            f"{r['itl_p99'] * 1e3:.1f} | {r['e2e_p50']:.2f} / {r['e2e_p99']:.2f} | "
            f"{r['mean_tokens']:.0f} | {r['load_before']:.2f} |"
        )
    return "\n".join(lines)


def settle(max_load: float, timeout: float = 180.0) -> None:
    """Wait until the 1-minute load average (raised by the previous target's own run) is back under
    `max_load`, or `timeout` passed; the load is recorded with the run either way."""
    deadline = time.monotonic() + timeout
    time.sleep(3)
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        time.sleep(5)


def ratios(rows: list[dict], max_load: float) -> str:
    """gateway / hf-serve at each client level, and mixed / gateway; withheld when a run had foreign load."""
    by = {(r["target"], r["clients"]): r for r in rows}
    lines = []
    pairs = (("gateway", "hf-serve"), ("mixed", "gateway"), ("gateway", "no-capture"), ("gateway", "unpacked"))
    for target, base in pairs:
        for clients in sorted({c for t, c in by if t == target}):
            a, b = by.get((target, clients)), by.get((base, clients))
            if a is None or b is None or not b["tok_s"]:
                continue
            load = max(a["load_before"], b["load_before"])
            ratio = a["tok_s"] / b["tok_s"]
            if load > max_load:
                lines.append(f"{target} / {base} at {clients} clients: withheld (load average {load:.2f} > {max_load})")
            else:
                lines.append(f"{target} / {base} at {clients} clients: {ratio:.2f}x (max load before {load:.2f})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--requests", type=int, nargs="+", default=[4, 32], help="requests sent at each --clients level (same order)"
    )
    parser.add_argument(
        "--serial-clients",
        type=int,
        nargs="+",
        help="client levels for the one-at-a-time target (default: --clients); its throughput does not depend "
        "on the clients, only its queueing does",
    )
    parser.add_argument("--targets", nargs="+", default=["gateway", "mixed", "hf-serve"])
    parser.add_argument("--max-load", type=float, default=1.0, help="withhold ratios above this load average")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument(
        "--hf-cb-args",
        default="--cb-num-blocks 512 --cb-block-size 32",
        help="continuous-batching flags for `transformers serve`: by default its KV cache is sized from free "
        "memory, and on this shared 24 GB machine it grew to 13.9 GB at 16 clients and was OOM-killed; "
        "512 blocks of 32 tokens hold 16 x 1024 tokens",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads for every target (gateway cpu_threads, OMP_NUM_THREADS for "
        "transformers serve, torch.set_num_threads in-process): equal for a fair run",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))

    work = Path(tempfile.mkdtemp(prefix="tuneops-bench-"))
    uri = register_versions(work)
    rows: list[dict] = []
    print(f"CPU flags: {cpu_flags()}; dtype {serve_dtype()}; {os.cpu_count()} cores; threads {args.threads}")

    def requests_for(c: int) -> int:
        return dict(zip(args.clients, args.requests, strict=False)).get(c, max(4, c))

    def run_server(target: str, proc: subprocess.Popen, port: int, models: list[str], ready: str) -> None:
        levels = args.serial_clients if target == "serial" and args.serial_clients else args.clients
        try:
            wait_http(f"http://127.0.0.1:{port}{ready}", proc)
            for c in levels:
                n = requests_for(c)
                settle(args.max_load)
                res = asyncio.run(load(f"http://127.0.0.1:{port}/v1", models, target, c, n, args.max_tokens))
                rows.append(res.row())
                print(table([rows[-1]]).splitlines()[-1], flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    for target in args.targets:
        print(f"== {target}", flush=True)
        port = free_port()
        try:
            if target == "gateway":
                run_server(
                    target,
                    start_gateway(uri, port, 32, work, args.threads),
                    port,
                    [MODEL_NAME],
                    "/health/ready",
                )
            elif target == "mixed":
                gateway = start_gateway(uri, port, 32, work, args.threads)
                run_server(target, gateway, port, [MODEL_NAME, f"{MODEL_NAME}@candidate"], "/health/ready")
            elif target == "no-capture":
                gateway = start_gateway(uri, port, 32, work, args.threads, capture=False)
                run_server(target, gateway, port, [MODEL_NAME], "/health/ready")
            elif target == "unpacked":
                gateway = start_gateway(uri, port, 32, work, args.threads, pack=False)
                run_server(target, gateway, port, [MODEL_NAME], "/health/ready")
            elif target == "serial":
                run_server(target, start_gateway(uri, port, 1, work, args.threads), port, [MODEL_NAME], "/health/ready")
            elif target == "hf-serve":
                proc, model = start_hf_serve(port, work, args.threads, args.hf_cb_args.split())
                run_server(target, proc, port, [model], "/health")
            elif target == "in-process":
                rows.append(in_process(args.max_tokens, requests_for(1), args.threads).row())
                print(table([rows[-1]]).splitlines()[-1], flush=True)
        except Exception as exc:
            print(f"  {target} failed: {type(exc).__name__}: {exc} (logs in {work})", file=sys.stderr)
    print()
    print(table(rows))
    print()
    print(ratios(rows, args.max_load))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
