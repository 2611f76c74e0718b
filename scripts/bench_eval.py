"""Time the evaluation of a SmolLM2-135M-Instruct version on this machine, as the pipeline runs it.

Registers a LoRA version of the embedded base model in a throw-away MLflow store, logs the shipped FAQ sample
(64 items) as its held-out split, then times `run_evaluation` with the `evaluation` section of a job file
(default `configs/default.yaml`: quality on 32 held-out items, samples of the published CrowS-Pairs and BBQ,
counterfactual templates, the version beside its base). `--full` scores every bias item; `--suite` limits the
suites (`--suite crows --full`: all 1,508 CrowS-Pairs pairs on the version and the base). With
`--with-production` a second version is registered and the first made production (a third model for quality).
The load average (`os.getloadavg`) before and after is printed with the figures: read them together.

    .venv/bin/python scripts/bench_eval.py [--config JOB.yaml] [--suite S ...] [--full] [--with-production]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def register_version(uri: str, workdir: Path, seed: int) -> str:
    """A LoRA version of smollm2-135m-instruct (zero B: answers like the base) with a held-out split."""
    import mlflow
    import torch
    from peft import LoraConfig, get_peft_model

    from core.models import load_causal_lm, load_tokenizer, resolve_base_model
    from core.pyfunc import publish_version, write_bundle
    from core.registry import Manifest
    from evaluate.readers import SUITES_DIR

    torch.manual_seed(seed)
    base = resolve_base_model("smollm2-135m-instruct")
    tokenizer = load_tokenizer(base)
    model = get_peft_model(
        load_causal_lm(base, torch.device("cpu"), torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    manifest = Manifest(base.name, base.digest, tokenizer.chat_template, tokenizer.eos_token, job_name="bench")
    bundle = write_bundle(workdir / f"bundle-{seed}", model, tokenizer, manifest)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("bench-eval")
    with mlflow.start_run():
        split = workdir / "validation.jsonl"
        split.write_text((SUITES_DIR / "faq_sample.jsonl").read_text())
        mlflow.log_artifact(str(split), "data")
        mv = publish_version(bundle, "bench-model", pip_requirements=["torch"])
    return str(mv.version)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with-production", action="store_true", help="Also compare with a production version.")
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"), help="Job file to read.")
    parser.add_argument("--suite", action="append", default=None, help="Suites to run (repeat); default the job's.")
    parser.add_argument("--full", action="store_true", help="Every item of the bias suites, no sample.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on shared cores).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from core.aliases import move_alias
    from core.config import read_yaml
    from core.device import choose_device, choose_dtype
    from core.registry import PRODUCTION, connect
    from core.schema.evaluation import EvaluationConfig
    from evaluate.gates import split_by_suite
    from evaluate.job import run_evaluation

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        workdir = Path(tmp)
        uri = f"sqlite:///{workdir}/mlflow.db"
        version = register_version(uri, workdir, seed=1)
        if args.with_production:
            move_alias(connect(uri), "bench-model", PRODUCTION, version, reason="bench")
            version = register_version(uri, workdir, seed=2)
        section = read_yaml(args.config)[0].get("evaluation") or {}
        if args.suite:
            section = {**section, "suites": args.suite, "gates": split_by_suite(section["gates"], args.suite)[0]}
        cfg = EvaluationConfig.model_validate({**section, "full": args.full})
        t0 = time.perf_counter()
        verdict = run_evaluation(f"bench-model/{version}", cfg, tracking_uri=uri)
        seconds = time.perf_counter() - t0
        run_metrics = connect(uri).get_run(verdict.evaluation_run).data.metrics
        per_suite = {k: round(v, 1) for k, v in run_metrics.items() if k.startswith("eval.seconds.")}
    keys = [
        "eval.rougeL",
        "eval.base.rougeL",
        "bias.crows_pct_stereotype",
        "bias.base.crows_pct_stereotype",
        "bias.bbq_bias_ambig",
        "bias.bbq_acc_disambig",
    ]
    print(
        json.dumps(
            {
                "seconds": round(seconds, 1),
                "config": str(args.config),
                "suites": cfg.suites,
                "full": cfg.full,
                "sample": cfg.sample.model_dump(),
                "with_production": args.with_production,
                "quality_items": cfg.max_examples,
                "max_new_tokens": cfg.max_new_tokens,
                "dtype": str(choose_dtype("auto", choose_device("auto"))),
                "torch_threads": torch.get_num_threads(),
                **per_suite,
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
                **{k: round(verdict.metrics[k], 4) for k in keys if k in verdict.metrics},
                "gates": [g.describe() for g in verdict.gates],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
