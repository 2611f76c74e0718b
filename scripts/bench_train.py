"""Training throughput: the tuneops recipe against the baseline a typical user writes, in one run.

Both arms train LoRA (same rank, targets, learning rate, seed) on the same examples of the default job; each
runs in its own process so peak memory and the allocator are its own. Reported: real (non-padding) tokens
per second, peak resident memory, and the validation loss after the same number of examples.

    python scripts/bench_train.py [--examples 128] [--config configs/default.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


def build_trainer(arm: str, cfg: Any, checked: Any, train: list, out_dir: Path, device: Any) -> tuple[Any, Any]:
    """The two arms on the same seeded LoRA init: the baseline a typical user writes, or the tuneops recipe."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    from core.device import choose_dtype
    from core.models import load_causal_lm
    from finetune.recipe import attach_lora, make_trainer, to_dataset, training_arguments

    set_seed(cfg.training.seed)
    if arm == "baseline":
        # Trainer + peft, every example padded to the longest allowed, fp32.
        dtype = torch.float32
        model = attach_lora(load_causal_lm(checked.base, device, dtype), cfg)
        args = training_arguments(cfg, out_dir, device, dtype, has_eval=False)
        args.include_num_input_tokens_seen = "no"
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=to_dataset(train),
            data_collator=DataCollatorForSeq2Seq(
                checked.tokenizer, padding="max_length", max_length=512, label_pad_token_id=-100
            ),
        )
        return trainer, dtype
    dtype = choose_dtype(cfg.model.dtype, device)
    model = attach_lora(load_causal_lm(checked.base, device, dtype), cfg)
    return make_trainer(cfg, model, checked.tokenizer, train, [], out_dir, device, dtype, []), dtype


def run_arm(arm: str, config: Path, examples: int, out_dir: Path) -> dict:

    from core.config import load_config
    from core.device import choose_device, dtype_name
    from core.schema.job import JobConfig
    from finetune.job import check

    cfg = load_config(
        JobConfig,
        config,
        [
            f"training.output_dir={out_dir}",
            "training.max_steps=-1",
            "training.epochs=1",
            "training.eval_steps=100000",
            "training.save_steps=100000",
            "training.logging_steps=1000",
            # 4 examples per micro-batch, 2 micro-batches per step: the padded baseline at 8 x 512 needs ~13 GB
            "training.batch_size=4",
            "training.gradient_accumulation_steps=2",
        ],
    )
    checked = check(cfg)
    train = checked.data.train[:examples]
    validation = checked.data.validation
    device = choose_device(cfg.model.device)
    trainer, dtype = build_trainer(arm, cfg, checked, train, out_dir, device)
    real_tokens = sum(len(t.input_ids) for t in train)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    from transformers import DataCollatorWithFlattening

    from finetune.recipe import to_dataset

    trainer.eval_dataset = to_dataset(validation)
    trainer.data_collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    eval_loss = trainer.evaluate()["eval_loss"]
    return {
        "arm": arm,
        "dtype": dtype_name(dtype),
        "examples": len(train),
        "real_tokens": real_tokens,
        "seconds": seconds,
        "tokens_per_second": real_tokens / seconds,
        "eval_loss": eval_loss,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "jemalloc": "jemalloc" in os.environ.get("LD_PRELOAD", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--arm", choices=["baseline", "recipe"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        result = run_arm(args.arm, args.config, args.examples, args.out.parent / f"ckpt-{args.arm}")
        args.out.write_text(json.dumps(result))
        return
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ("baseline", "recipe"):
            env = dict(os.environ)
            if arm == "recipe" and JEMALLOC.is_file():
                env["LD_PRELOAD"] = str(JEMALLOC)
            out = Path(tmp) / f"{arm}.json"
            cmd = [
                sys.executable,
                __file__,
                "--arm",
                arm,
                "--config",
                str(args.config),
                "--examples",
                str(args.examples),
                "--out",
                str(out),
            ]
            subprocess.run(cmd, env=env, check=True)
            results.append(json.loads(out.read_text()))
    base, recipe = results
    print(f"\n{'arm':10} {'dtype':6} {'examples':>8} {'real tok/s':>11} {'peak MiB':>9} {'val loss':>9}")
    for r in results:
        print(
            f"{r['arm']:10} {r['dtype']:6} {r['examples']:8d} {r['tokens_per_second']:11.1f} "
            f"{r['peak_rss_mib']:9.0f} {r['eval_loss']:9.4f}"
        )
    print(
        f"speed-up: {recipe['tokens_per_second'] / base['tokens_per_second']:.2f}x real tokens/s; "
        f"memory: {recipe['peak_rss_mib'] / base['peak_rss_mib']:.2f}x peak"
    )


if __name__ == "__main__":
    main()
