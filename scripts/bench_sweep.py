"""Does a small search beat the default job? A sweep over learning rate and LoRA rank on configs/default.yaml,
and its best trial against the default job, both measured on test items neither trained nor was selected on.

The embedded FAQ is split once (seeded) into a test file (--test-share of the rows) and the rest. The default
job and every trial train on the rest, with the job's own 10% validation split, on which the sweep picks its
best trial (and prunes). Both adapters are then scored on the test file: answer-token loss and perplexity, as
evaluation measures them, with a paired bootstrap interval of the difference. Everything goes to a throw-away
MLflow store unless --tracking-uri names one.

    .venv/bin/python scripts/bench_sweep.py [--trials 8] [--pruner median] [--json out.json]
    .venv/bin/python scripts/bench_sweep.py --base PATH --max-steps 2 --trials 2   # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEARCH = {
    "training.learning_rate": "log_uniform(5e-5, 2e-3)",
    "lora.r": "choice([4, 8, 16, 32])",
}


def split_faq(workdir: Path, test_share: float, seed: int) -> tuple[Path, Path]:
    """The embedded FAQ's rows, shuffled once: a test file and the rest (the training data of both sides)."""
    from finetune.data import resolve_path

    rows = [line for line in resolve_path(Path("builtin:zaragoza-faq")).read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    cut = max(1, round(len(rows) * test_share))
    test, rest = workdir / "test.jsonl", workdir / "train.jsonl"
    test.write_text("\n".join(rows[:cut]) + "\n")
    rest.write_text("\n".join(rows[cut:]) + "\n")
    return rest, test


def job_overrides(args: argparse.Namespace, train: Path, out: Path, uri: str) -> list[str]:
    overrides = [
        f"data.path={train}",
        f"training.output_dir={out}",
        f"training.eval_steps={args.eval_steps}",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=bench-sweep",
        "registry.model_name=bench-sweep",
        "registry.promote=manual",
        "evaluation=null",
    ]
    if args.base:
        overrides.append(f"model.base={args.base}")
    if args.max_steps:
        overrides.append(f"training.max_steps={args.max_steps}")
    return overrides


def score(bundle: Path, items: list[Any], device: str) -> Any:
    """Held-out quality of one adapter (greedy answers cut to one token: only the loss is used)."""
    from core.version import OpenedVersion
    from evaluate.quality import run_quality
    from evaluate.subjects import MODEL, load_subjects

    subjects = load_subjects(OpenedVersion.read(bundle), None, False, device)  # type: ignore[arg-type]
    return run_quality(subjects, items, 1, 16, 8).metrics[MODEL]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="Trials the sweep finishes.")
    parser.add_argument("--pruner", default="median", choices=["none", "median", "hyperband"])
    parser.add_argument("--seed", type=int, default=0, help="Seed of the sampler and of the test split.")
    parser.add_argument("--test-share", type=float, default=0.15, help="Share of the FAQ held out for the test.")
    parser.add_argument("--eval-steps", type=int, default=5, help="Validation every N steps (what the pruner sees).")
    parser.add_argument("--max-steps", type=int, default=0, help="Override training.max_steps (0: the job's).")
    parser.add_argument("--base", default="", help="Another base model (a quick check of the script).")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--tracking-uri", default="", help="MLflow store; default a throw-away SQLite file.")
    parser.add_argument("--workdir", type=Path, default=None, help="Keep outputs here instead of a temp folder.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the numbers here.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import numpy as np

    from core.config import load_config
    from core.schema.job import JobConfig
    from evaluate.bootstrap import draws, interval
    from evaluate.readers import read_quality
    from finetune.job import run_job
    from tuneops.sweep import run_sweep

    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        uri = args.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
        train, test = split_faq(workdir, args.test_share, args.seed)
        job = ROOT / "configs" / "default.yaml"

        default_cfg = load_config(
            JobConfig, job, [*job_overrides(args, train, workdir / "default", uri), "registry.register_version=false"]
        )
        t0 = time.perf_counter()
        default = run_job(default_cfg, "default")
        default_s = time.perf_counter() - t0
        assert default.bundle is not None

        search = [f"sweep.params.{key}={dist}" for key, dist in SEARCH.items()]
        sweep_cfg = load_config(
            JobConfig,
            job,
            [
                *job_overrides(args, train, workdir / "sweep", uri),
                *search,
                f"sweep.n_trials={args.trials}",
                f"sweep.pruner={args.pruner}",
                f"sweep.seed={args.seed}",
            ],
        )
        t0 = time.perf_counter()
        swept = run_sweep(sweep_cfg, "default-sweep", report=print)
        sweep_s = time.perf_counter() - t0
        if swept.best is None:
            sys.exit("no trial completed")
        best = swept.best
        bundles = sorted((workdir / "sweep" / "sweep").glob(f"trial-{best.number:04d}/*/runs/{best.run_id}/final"))
        if not bundles:
            sys.exit(f"the best trial's adapter is not under {workdir / 'sweep'}")

        items = read_quality(test)
        ours, theirs = score(bundles[0], items, args.device), score(default.bundle, items, args.device)
        rng = np.random.default_rng(args.seed)
        idx = draws(len(items), 2000, rng)
        diff = ours["loss"].resample(idx) - theirs["loss"].resample(idx)
        ci = interval(diff, 0.95)

        numbers = {
            "test_items": len(items),
            "trials": swept.counts(),
            "best_trial": best.number,
            "best_params": best.params,
            "validation_eval_loss": {"default": default.metrics.get("eval_loss"), "best_trial": best.value},
            "test_loss": {"default": theirs["loss"].value, "best_trial": ours["loss"].value},
            "test_perplexity": {"default": theirs["perplexity"].value, "best_trial": ours["perplexity"].value},
            "test_loss_difference": ours["loss"].value - theirs["loss"].value,
            "test_loss_difference_ci95": ci,
            "seconds": {"default": round(default_s, 1), "sweep": round(sweep_s, 1)},
            "importance": swept.importances,
        }
        print()
        print(f"default job:  validation eval_loss {default.metrics.get('eval_loss', float('nan')):.4f}")
        print(f"best trial {best.number}: validation eval_loss {best.value:.4f}  {best.params}")
        print(f"test ({len(items)} items, neither trained nor selected on):")
        print(f"  loss        default {theirs['loss'].value:.4f}   best trial {ours['loss'].value:.4f}")
        print(f"  perplexity  default {theirs['perplexity'].value:.3f}   best trial {ours['perplexity'].value:.3f}")
        ci_text = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "n/a"
        print(f"  loss difference (best - default) {numbers['test_loss_difference']:+.4f}, 95% CI {ci_text}")
        verdict = "beats" if ci and ci[1] < 0 else "is worse than" if ci and ci[0] > 0 else "does not clearly beat"
        print(f"the best trial {verdict} configs/default.yaml on held-out loss")
        print(f"time: default {default_s:.0f} s, sweep {sweep_s:.0f} s ({swept.counts()})")
        if args.json:
            args.json.write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
