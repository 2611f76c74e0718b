"""CUDA check for training (run by scripts/device_check.sh; < 4 min on an H100/H200).

Nothing is fetched: the base model is SmolLM2-135M-shaped with RANDOM weights, built from the real config and
tokenizer carried in .devcarry/smollm2-config, saved with a fixed seed into a folder that serves as `model.base`.

    python scripts/device_check_train.py --base-dir DIR --build-only          # only build the base folder
    python scripts/device_check_train.py --base-dir DIR --json OUT.json       # arms + job (+ QLoRA if possible)
    python scripts/device_check_train.py ... --cpu-smoke                      # same code paths, tiny, on CPU
    python scripts/device_check_train.py --serve-smoke -- ARGS                # CPU shim for device_check_serve.py

Training measures, on the same examples of `builtin:zaragoza-faq` with the same LoRA config:
  padded:  Trainer + peft, every example padded to 512, fp32 (batch size examples per micro-batch);
  dynamic: Trainer + peft, dynamic padding to the longest, bf16 (batch size examples per micro-batch);
  recipe:  finetune.recipe.make_trainer: packed rows of --tokens-per-batch tokens, packed attention (varlen
           flash on CUDA), fused linear + cross-entropy when liger-kernel is installed, bf16;
real (non-padding) tokens/s, peak torch.cuda.max_memory_allocated, validation loss after training (the same
packed evaluation for every arm), and MFU: 4 x parameters FLOP per real token against the measured bf16 matmul
rate and, for known GPUs, the nominal dense bf16 peak. Targets: recipe >= 2x padded tokens/s at no worse
validation loss. Then one full finetune.job.run_job with a temporary sqlite MLflow store, and the registered
version loaded back through mlflow.pyfunc. Exit status 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIG_DIR = ROOT / ".devcarry" / "smollm2-config"
SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
SYSTEM_PROMPT = (
    "You are the customer assistant of Zaragoza AB, a construction company in Sweden. Answer briefly and precisely."
)
# --cpu-smoke: a 2-layer model of the same family and vocabulary, so every code path runs in seconds on CPU
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def log(msg: str) -> None:
    print(msg, flush=True)


def build_base(config_dir: Path, out: Path, tiny: bool, seed: int = 1234) -> Path:
    """A random-weight model from the real config + tokenizer, saved as a Hugging Face safetensors folder."""
    from bench_train import random_weight_base

    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        log(f"base: reusing {out}")
        return out
    t0 = time.perf_counter()
    params = random_weight_base(config_dir, out, TINY if tiny else {}, seed)
    log(f"base: random-weight model with {params / 1e6:.1f}M parameters in {out} ({time.perf_counter() - t0:.1f} s)")
    return out


def job_config(base: Path, out_dir: Path, batch_size: int, extra: list[str] | None = None) -> Any:
    from core.config import load_config
    from core.schema.job import JobConfig

    # No job file: the default YAML is being edited by others; every value that matters is set here.
    overrides = [
        f"model.base={base}",
        "data.path=builtin:zaragoza-faq",
        f"data.system_prompt={SYSTEM_PROMPT}",
        "data.max_length=512",
        "data.validation_split=0.1",
        "lora.r=16",
        "lora.alpha=32",
        "lora.target_modules=all-linear",
        f"training.output_dir={out_dir}",
        "training.max_steps=-1",
        "training.epochs=1",
        "training.eval_steps=100000",
        "training.save_steps=100000",
        "training.logging_steps=1000",
        f"training.batch_size={batch_size}",
        "training.gradient_accumulation_steps=1",
        "training.learning_rate=3e-4",
        *(extra or []),
    ]
    return load_config(JobConfig, None, overrides)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_memory(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib(device: Any) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # CPU smoke: process peak RSS


def warm_up(checked: Any, cfg: Any, device: Any) -> None:
    """One forward/backward per dtype and shape, so neither timed arm pays for CUDA/cuBLAS initialisation."""
    import torch

    from core.device import choose_dtype
    from core.models import load_causal_lm
    from finetune.recipe import attach_lora

    t0 = time.perf_counter()
    ids = checked.data.train[0].input_ids
    for dtype in {torch.float32, choose_dtype(cfg.model.dtype, device)}:
        model = attach_lora(load_causal_lm(checked.base, device, dtype), cfg)
        x = torch.tensor([ids] * 2, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            model(input_ids=x, labels=x).loss.backward()
        del model, x
    _sync(device)
    _reset_memory(device)
    log(f"warm-up: {time.perf_counter() - t0:.1f} s")


# Nominal dense bf16 tensor-core peaks (TFLOP/s), for MFU; other GPUs get the measured matmul rate only.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "L40S": 362.0}


def nominal_peak(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run_arm(arm: str, checked: Any, cfg: Any, train: list, validation: list, out_dir: Path, device: Any) -> dict:
    """bench_train.py's arms, on the device, with peak device memory."""
    from bench_train import build_trainer
    from transformers import DataCollatorWithFlattening

    from core.device import dtype_name
    from finetune.recipe import fused_loss_applies, to_dataset

    _reset_memory(device)
    trainer, dtype = build_trainer(arm, cfg, checked, train, out_dir, device)
    real_tokens = sum(len(t.input_ids) for t in train)
    _sync(device)
    t0 = time.perf_counter()
    result = trainer.train()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak_train = _peak_mib(device)
    trainer.eval_dataset = to_dataset(validation)
    trainer.data_collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    eval_loss = float(trainer.evaluate()["eval_loss"])
    params = sum(p.numel() for p in trainer.model.parameters())
    out = {
        "arm": arm,
        "dtype": dtype_name(dtype),
        "device": str(device),
        "attention": getattr(trainer.model.get_base_model().config, "_attn_implementation", "?"),
        "fused_loss": arm in ("recipe", "compiled") and fused_loss_applies(trainer.model, device),
        "examples": len(train),
        "steps": int(result.global_step),
        "real_tokens": real_tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(real_tokens / seconds, 1),
        "flop_per_token": 4 * params,
        "train_loss": round(float(result.training_loss), 4),
        "eval_loss": round(eval_loss, 4),
        "peak_mib": round(peak_train, 1) if peak_train is not None else None,
        "peak_kind": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss (process)",
    }
    del trainer
    _reset_memory(device)
    return out


def arms(
    base: Path,
    work: Path,
    examples: int,
    batch_size: int,
    tokens_per_batch: int | None,
    device: Any,
    compiled: bool = False,
) -> dict:
    import torch
    from bench_train import matmul_rate

    from finetune.job import check

    cfg = job_config(base, work / "arms", batch_size, [f"model.device={device.type}"])
    checked = check(cfg)
    log(f"data: {checked.data.report.summary()}")
    train = checked.data.train[:examples]
    validation = checked.data.validation[: 16 if device.type == "cpu" else None]  # CPU smoke: keep it short
    if len(train) < examples:
        log(f"note: only {len(train)} training examples available (asked for {examples})")
    if tokens_per_batch is None:  # rows of as many examples on average as the baselines' micro-batches
        tokens_per_batch = max(16, round(batch_size * sum(len(t.input_ids) for t in train) / len(train)))
    log(f"recipe: rows of up to {tokens_per_batch} tokens; baselines: {batch_size} examples per micro-batch")
    size = 8192 if device.type == "cuda" else 512
    rate = matmul_rate(torch.bfloat16, size=size, seconds=2.0, device=device) * 1e9
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = nominal_peak(name)
    log(f"bf16 matmul {size}^3: {rate / 1e12:.1f} TFLOP/s measured; nominal peak {peak or 'unknown'} TFLOP/s")
    if device.type == "cuda":
        warm_up(checked, cfg, device)
    recipe_cfg = job_config(
        base,
        work / "arms",
        batch_size,
        [f"model.device={device.type}", f"training.tokens_per_batch={tokens_per_batch}"],
    )
    results = []
    for arm in ("padded", "dynamic", "recipe", *(["compiled"] if compiled else [])):
        arm_cfg = cfg
        if arm == "recipe":
            arm_cfg = recipe_cfg
        elif arm == "compiled":  # the recipe with training.compile (decoder layers compiled, attention eager)
            arm_cfg = recipe_cfg.model_copy(
                update={"training": recipe_cfg.training.model_copy(update={"compile": True})}
            )
        r = run_arm(arm, checked, arm_cfg, train, validation, work / f"ckpt-{arm}", device)
        useful = r["tokens_per_second"] * r["flop_per_token"]
        r["matmul_share"] = round(useful / rate, 4)
        r["mfu"] = round(useful / (peak * 1e12), 4) if peak else None
        log(
            f"{r['arm']:8} {r['dtype']:5} {r['attention']:15} {r['examples']:4d} ex {r['steps']:3d} steps "
            f"{r['seconds']:7.2f} s {r['tokens_per_second']:10.1f} real tok/s  peak {r['peak_mib']:8.0f} MiB  "
            f"val loss {r['eval_loss']:.4f}  {100 * r['matmul_share']:.1f}% of bf16 matmul  MFU {r['mfu']}"
        )
        results.append(r)
    by_arm = {r["arm"]: r for r in results}
    ratios = {}
    for name_ in ("padded", "dynamic"):
        b, r = by_arm[name_], by_arm["recipe"]
        ratios[name_] = {
            "tokens_per_second": round(r["tokens_per_second"] / b["tokens_per_second"], 2),
            "peak_memory": round(r["peak_mib"] / b["peak_mib"], 3) if b["peak_mib"] else None,
            "eval_loss_delta": round(r["eval_loss"] - b["eval_loss"], 4),
        }
        q = ratios[name_]
        log(
            f"recipe / {name_}: {q['tokens_per_second']:.2f}x real tokens/s, {q['peak_memory']}x peak memory, "
            f"val loss {q['eval_loss_delta']:+.4f}"
        )
    if "compiled" in by_arm:
        speed = by_arm["compiled"]["tokens_per_second"] / by_arm["recipe"]["tokens_per_second"]
        log(f"compiled / recipe: {speed:.2f}x real tokens/s, compiling included")
    target = ratios["padded"]["tokens_per_second"] >= 2 and ratios["padded"]["eval_loss_delta"] <= 0.01
    log(f"target (recipe >= 2x padded tokens/s, no worse val loss): {'MET' if target else 'NOT MET'}")
    return {
        **by_arm,
        "ratio": ratios,
        "target_met": target,
        "bf16_matmul_tflops": round(rate / 1e12, 2),
        "nominal_peak_tflops": peak,
        "tokens_per_batch": tokens_per_batch,
        "validation_examples": len(validation),
    }


def full_job(base: Path, work: Path, batch_size: int, steps: int, device: Any, quantization: str = "none") -> dict:
    """finetune.job.run_job end to end: MLflow run on a temp sqlite store, adapter bundle, registered version."""
    from core.registry import connect
    from finetune.job import run_job

    tag = "qlora" if quantization != "none" else "job"
    root = work / tag
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = job_config(
        base,
        root / "out",
        batch_size,
        [
            f"model.device={device.type}",
            f"model.quantization={quantization}",
            f"training.max_steps={steps}",
            f"training.eval_steps={max(1, steps // 2)}",
            f"training.save_steps={max(1, steps // 2)}",
            "training.logging_steps=5",
            f"tracking.tracking_uri={uri}",
            f"tracking.experiment=device-check-{tag}",
            f"registry.model_name=device-check-{tag}",
            f"registry.register_version={'true' if quantization == 'none' else 'false'}",
        ],
    )
    cwd = Path.cwd()
    os.chdir(root)  # MLflow's default artifact root (./mlruns) lands in the temp folder, not the repo
    try:
        _reset_memory(device)
        t0 = time.perf_counter()
        res = run_job(cfg, f"device-check-{tag}")
        seconds = time.perf_counter() - t0
        client = connect(uri)
        run = client.get_run(res.run_id)
        out: dict[str, Any] = {
            "run_id": res.run_id,
            "status": run.info.status,
            "model": res.model_name,
            "version": res.version,
            "seconds": round(seconds, 1),
            "peak_mib": round(_peak_mib(device) or 0, 1),
            "metrics": {k: round(v, 4) for k, v in res.metrics.items()},
            "logged_metrics": sorted(run.data.metrics),
            "artifacts": sorted(a.path for a in client.list_artifacts(res.run_id)),
        }
        log(
            f"{tag}: run {res.run_id} {run.info.status}, registered {res.model_name} version {res.version} "
            f"in {seconds:.1f} s; eval_loss {res.metrics.get('eval_loss')}"
        )
        if res.version is not None:
            import mlflow.pyfunc

            t1 = time.perf_counter()
            loaded = mlflow.pyfunc.load_model(f"models:/{res.model_name}/{res.version}")
            answer = loaded.predict(["What is a building permit?"], params={"max_new_tokens": 16})
            impl = loaded.unwrap_python_model()
            out["pyfunc"] = {
                "device": str(impl.device),
                "dtype": str(next(impl.model.parameters()).dtype),
                "answer_chars": len(answer[0]),
                "seconds": round(time.perf_counter() - t1, 1),
            }
            log(f"pyfunc: models:/{res.model_name}/{res.version} loaded on {impl.device}, answered {answer[0][:60]!r}")
        return out
    finally:
        os.chdir(cwd)


def step(name: str, summary: dict, fn: Any, *a: Any, **kw: Any) -> bool:
    log(f"\n=== {name}")
    try:
        summary[name] = fn(*a, **kw)
        return True
    except Exception as exc:
        traceback.print_exc()
        summary[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        log(f"{name}: FAILED ({type(exc).__name__}: {exc})")
        return False


def serve_smoke(argv: list[str]) -> int:
    """CPU only: run scripts/device_check_serve.py unchanged, with CUDA faked and the gateway on CPU."""
    import runpy

    import torch

    import serve.settings

    real_available = torch.cuda.is_available

    def available_once() -> bool:  # True for the script's own check only; the gateway then sees the truth
        torch.cuda.is_available = real_available  # type: ignore[assignment]
        return True

    torch.cuda.is_available = available_once  # type: ignore[assignment]
    torch.cuda.get_device_name = lambda *a, **k: "CPU (serve smoke)"  # type: ignore[assignment]
    real = serve.settings.ServeSettings

    class CpuServeSettings(real):  # type: ignore[misc, valid-type]
        def __init__(self, **kw: Any) -> None:
            kw["device"] = "cpu"
            super().__init__(**kw)

    serve.settings.ServeSettings = CpuServeSettings  # type: ignore[misc]
    sys.argv = [str(ROOT / "scripts" / "device_check_serve.py"), *argv]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-dir", type=Path, default=None, help="where the random-weight base folder goes")
    parser.add_argument("--config-dir", type=Path, default=CONFIG_DIR)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true", default=os.environ.get("DEVICE_CHECK_CPU") == "1")
    parser.add_argument("--serve-smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="the recipe's token budget per row")
    parser.add_argument("--job-steps", type=int, default=None)
    parser.add_argument(
        "--compiled",
        action="store_true",
        default=os.environ.get("DEVICE_CHECK_COMPILED") == "1",
        help="also the recipe with training.compile (its first steps compile; DEVICE_CHECK_COMPILED=1)",
    )
    parser.add_argument("--skip", default="", help="comma-separated: arms,job,qlora")
    args, rest = parser.parse_known_args()
    if args.serve_smoke:
        return serve_smoke([a for a in rest if a != "--"])

    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        log("no CUDA device (use --cpu-smoke or DEVICE_CHECK_CPU=1 for the CPU smoke run)")
        return 2
    if smoke:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    device = torch.device("cpu" if smoke else "cuda")
    examples = args.examples or (8 if smoke else 512)
    batch_size = args.batch_size or (4 if smoke else 32)
    tokens_per_batch = args.tokens_per_batch  # None: batch size x mean example length (same examples per step)
    job_steps = args.job_steps or (2 if smoke else 20)
    work = Path(tempfile.mkdtemp(prefix="tuneops-devcheck-train-"))
    base_dir = (args.base_dir or work / "base").resolve()

    import transformers

    summary: dict[str, Any] = {
        "mode": "cpu-smoke" if smoke else "cuda",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "examples": examples,
        "batch_size": batch_size,
        "tokens_per_batch": tokens_per_batch,
    }
    for lib in ("peft", "accelerate", "mlflow", "datasets", "pydantic", "liger_kernel"):
        try:
            summary[lib] = __import__(lib).__version__
        except Exception as exc:
            summary[lib] = f"missing ({type(exc).__name__})"
    log(json.dumps(summary))

    ok = step("base", summary, lambda: {"path": str(build_base(args.config_dir, base_dir, tiny=smoke))})
    skip = set(filter(None, args.skip.split(",")))
    if ok and not args.build_only:
        if "arms" not in skip:
            ok &= step(
                "arms", summary, arms, base_dir, work, examples, batch_size, tokens_per_batch, device, args.compiled
            )
        if "job" not in skip:
            ok &= step("job", summary, full_job, base_dir, work, batch_size, job_steps, device)
        if "qlora" not in skip:
            if device.type == "cuda" and importlib.util.find_spec("bitsandbytes") is not None:
                ok &= step("qlora", summary, full_job, base_dir, work, batch_size, 5, device, "4bit")
            else:
                why = "no CUDA (smoke)" if device.type != "cuda" else "bitsandbytes is not installed"
                summary["qlora"] = {"skipped": why}
                log(f"\n=== qlora\nskipped: {why}")
    summary["ok"] = bool(ok)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    log(f"\ntrain check: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
