"""Training throughput: the tuneops recipe against two baselines users write, in one run.

Every arm trains LoRA (same rank, targets, learning rate, seed, examples per micro-batch and per optimizer step)
on the same first examples of the default job, each in its own process so peak memory and the allocator are
its own:

  padded:  what a typical user writes: Trainer + peft, every example padded to 512 tokens, fp32;
  dynamic: what a competent user writes: Trainer + peft, dynamic padding to the longest in the micro-batch
           (DataCollatorForSeq2Seq), bf16 where the CPU has it (core.device's choice), else fp32;
  recipe:  finetune.recipe: padding-free packing with packed attention, logits only at trained positions, the
           dtype core.device picks, jemalloc.
  compiled: the recipe with `training.compile: true` (not run unless named in --arms: compiling takes minutes).
  peft-lora: the recipe with peft's own LoRA forward instead of `finetune.lora_linear` (not run unless named).

Reported per arm: real (non-padding) tokens/s, peak resident memory, validation loss after training (the same
packed evaluation for every arm), and the share of the machine's measured matmul rate in the arm's dtype that
the useful work reaches (4 x parameters FLOP per real token: forward plus input gradients). Every arm sees the
same micro-batches in the same order, so their optimizer steps after the first --warmup-steps (where compiling
happens) compare one to one: their seconds are printed too. The script prints the CPU, its flags and the fp32 /
bf16 rates of a 1024^3 matmul, measured before and after the arms; the higher of the two is the denominator.

The quiet measurement (nothing else running on the machine):

    .venv/bin/python scripts/bench_train.py --examples 32

Smoke check that it runs: .venv/bin/python scripts/bench_train.py --examples 4 --validation 4

Larger models of the same family: `--shape 360m` or `--shape 1.7b` trains a random-weight model with the
published SmolLM2-360M / 1.7B dimensions and the embedded tokenizer (built once into the tuneops cache; its
losses mean nothing, its speed is the model size's):

    .venv/bin/python scripts/bench_train.py --shape 1.7b --arms dynamic recipe --examples 32
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
ARMS = ("padded", "dynamic", "recipe", "compiled", "peft-lora")
RECIPES = ("recipe", "compiled", "peft-lora")
DEFAULT_ARMS = ("padded", "dynamic", "recipe")
# Published SmolLM2 dimensions (vocabulary, tokenizer and the rest from the embedded 135M model's config).
SHAPES: dict[str, dict[str, int]] = {
    "135m": {},
    "360m": {
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "head_dim": 64,
    },
    "1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 64,
    },
}
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and the flags that decide the fast dtype."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": "unknown", "flags": []}
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return {"model": model, "flags": [f for f in FLAGS if f in flags], "cores": os.cpu_count()}


def matmul_rate(dtype: Any, size: int = 1024, seconds: float = 2.0, device: Any = None) -> float:
    """Measured GFLOP/s of a size^3 matmul in `dtype` (best of repeated runs for about `seconds`)."""
    import torch

    device = device or torch.device("cpu")
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # first call: allocations, kernel selection
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def random_weight_base(source: Path, out: Path, dims: dict[str, int], seed: int = 0, dtype: str = "float32") -> int:
    """A random-weight model with `source`'s config changed by `dims`, and `source`'s tokenizer, generation config
    and chat template, saved as a safetensors folder at `out` (written aside and moved, so a folder there is
    whole); its number of parameters."""
    import shutil
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(source)
    for key, value in dims.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    if (source / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(tmp)
    if (source / "chat_template.jinja").is_file() and not (tmp / "chat_template.jinja").is_file():
        shutil.copy(source / "chat_template.jinja", tmp / "chat_template.jinja")
    if out.exists():
        shutil.rmtree(out)
    shutil.move(str(tmp), str(out))
    return sum(p.numel() for p in model.parameters())


def shaped_base(config: Path, shape: str) -> Path | None:
    """A random-weight model of `shape` beside the embedded base in the tuneops cache (built once); None for the
    embedded model itself."""
    if not SHAPES[shape]:
        return None
    from core.config import load_config
    from core.models import cache_dir, resolve_base_model
    from core.schema.job import JobConfig

    out = cache_dir() / "bench-bases" / f"smollm2-{shape}-random"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    embedded = resolve_base_model(load_config(JobConfig, config).model.base).path
    print(f"building a random-weight SmolLM2-{shape}-shaped model in {out} (once)", flush=True)
    random_weight_base(embedded, out, SHAPES[shape], dtype="bfloat16")  # the size the arms train in
    return out


def build_trainer(arm: str, cfg: Any, checked: Any, train: list, out_dir: Path, device: Any) -> tuple[Any, Any]:
    """One arm's Trainer on the same seeded LoRA init: `padded`, `dynamic` or `recipe` (see the docstring)."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    from core.device import choose_dtype
    from core.models import load_causal_lm
    from finetune.recipe import attach_lora, make_trainer, to_dataset, training_arguments

    set_seed(cfg.training.seed)
    if arm in ("padded", "baseline"):
        dtype = torch.float32
        padding: dict[str, Any] = {"padding": "max_length", "max_length": 512}
    elif arm == "dynamic":
        dtype = choose_dtype("auto", device)
        padding = {"padding": "longest"}
    else:  # recipe, compiled (the config says compile), peft-lora
        dtype = choose_dtype(cfg.model.dtype, device)
        if arm == "peft-lora":
            import finetune.recipe

            finetune.recipe.fuse_lora_layers = lambda model: 0  # type: ignore[assignment]
        model = attach_lora(load_causal_lm(checked.base, device, dtype), cfg)
        return make_trainer(cfg, model, checked.tokenizer, train, [], out_dir, device, dtype, []), dtype
    model = attach_lora(load_causal_lm(checked.base, device, dtype), cfg)
    args = training_arguments(cfg, out_dir, device, dtype, has_eval=False)
    args.include_num_input_tokens_seen = "no"
    collator = DataCollatorForSeq2Seq(checked.tokenizer, label_pad_token_id=-100, **padding)
    trainer = Trainer(model=model, args=args, train_dataset=to_dataset(train), data_collator=collator)
    return trainer, dtype


def run_arm(
    arm: str, config: Path, examples: int, validation: int, out_dir: Path, extra: list[str], base: Path | None
) -> dict:
    import torch
    from transformers import DataCollatorWithFlattening, TrainerCallback

    from core.config import load_config
    from core.device import choose_device, dtype_name
    from core.schema.job import JobConfig
    from finetune.job import check
    from finetune.recipe import to_dataset

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
            # 4 examples per micro-batch, 2 micro-batches per step: the padded arm at 8 x 512 needs ~13 GB
            "training.batch_size=4",
            "training.gradient_accumulation_steps=2",
            *([f"model.base={base}"] if base else []),
            *(extra if arm in RECIPES else []),
            *(["training.compile=true"] if arm == "compiled" else []),
        ],
    )
    checked = check(cfg)
    train = checked.data.train[:examples]
    held_out = checked.data.validation[:validation]
    device = choose_device(cfg.model.device)
    trainer, dtype = build_trainer(arm, cfg, checked, train, out_dir, device)
    real_tokens = sum(len(t.input_ids) for t in train)

    class StepClock(TrainerCallback):
        """Each optimizer step's wall time."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.began = 0.0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.began = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.seconds.append(time.perf_counter() - self.began)

    steps = StepClock()
    trainer.add_callback(steps)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    # The same evaluation for every arm: packed rows, exact (transformers keeps packed examples apart).
    trainer.eval_dataset = to_dataset(held_out)
    trainer.data_collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    eval_loss = trainer.evaluate()["eval_loss"]
    model = trainer.model
    params = sum(p.numel() for p in model.parameters())
    return {
        "arm": arm,
        "dtype": dtype_name(dtype),
        "attention": getattr(model.get_base_model().config, "_attn_implementation", "?"),
        "examples": len(train),
        "real_tokens": real_tokens,
        "seconds": seconds,
        "tokens_per_second": real_tokens / seconds,
        "step_seconds": steps.seconds,
        "flop_per_token": 4 * params,
        "eval_loss": eval_loss,
        "validation_examples": len(held_out),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "jemalloc": "jemalloc" in os.environ.get("LD_PRELOAD", ""),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("configs/default.yaml"))
    parser.add_argument("--examples", type=int, default=32, help="training examples per arm")
    parser.add_argument("--validation", type=int, default=50, help="held-out examples for the validation loss")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS))
    parser.add_argument(
        "--warmup-steps", type=int, default=2, help="optimizer steps left out of the step-by-step comparison"
    )
    parser.add_argument("--shape", choices=SHAPES, default="135m", help="model size (random weights above 135m)")
    parser.add_argument("--tokens-per-batch", type=int, default=None, help="recipe only: micro-batches by token budget")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra = [f"training.tokens_per_batch={args.tokens_per_batch}"] if args.tokens_per_batch else []
    if args.arm:
        out_dir = args.out.parent / args.arm
        result = run_arm(args.arm, args.config, args.examples, args.validation, out_dir, extra, args.base)
        args.out.write_text(json.dumps(result))
        return
    import tempfile

    import torch

    base = shaped_base(args.config, args.shape)
    cpu = cpu_description()
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    print(f"cpu: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags']) or 'none of ' + str(FLAGS)}")
    print(
        f"matmul 1024^3 ({torch.get_num_threads()} threads): fp32 {rates['fp32']:.1f} GFLOP/s, "
        f"bf16 {rates['bf16']:.1f} GFLOP/s"
    )
    print(f"model: SmolLM2-{args.shape}" + (f" shape, random weights ({base})" if base else " (embedded weights)"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in args.arms:
            env = dict(os.environ)
            if arm in RECIPES and JEMALLOC.is_file():
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
                "--validation",
                str(args.validation),
                "--out",
                str(out),
            ]
            if args.tokens_per_batch:
                cmd += ["--tokens-per-batch", str(args.tokens_per_batch)]
            if base:
                cmd += ["--base", str(base)]
            subprocess.run(cmd, env=env, check=True)
            results.append(json.loads(out.read_text()))
    # The rate moves between runs on shared hosts; the higher of two measurements keeps "% matmul" conservative.
    after = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    print(f"matmul 1024^3 again after the arms: fp32 {after['fp32']:.1f} GFLOP/s, bf16 {after['bf16']:.1f} GFLOP/s")
    rates = {name: max(rate, after[name]) for name, rate in rates.items()}
    print(
        f"\n{'arm':9} {'dtype':5} {'attention':15} {'examples':>8} {'real tok/s':>11} {'% matmul':>8} "
        f"{'peak MiB':>9} {'val loss':>9} {'s after warm-up':>15}"
    )
    for r in results:
        useful = r["tokens_per_second"] * r["flop_per_token"] / 1e9
        r["matmul_share"] = useful / rates[r["dtype"]] if r["dtype"] in rates else float("nan")
        r["seconds_after_warmup"] = sum(r["step_seconds"][args.warmup_steps :])
        print(
            f"{r['arm']:9} {r['dtype']:5} {r['attention']:15} {r['examples']:8d} {r['tokens_per_second']:11.1f} "
            f"{100 * r['matmul_share']:7.1f}% {r['peak_rss_mib']:9.0f} {r['eval_loss']:9.4f} "
            f"{r['seconds_after_warmup']:15.1f}"
        )
    by_arm = {r["arm"]: r for r in results}
    if "recipe" in by_arm:
        recipe = by_arm["recipe"]
        for name in ("padded", "dynamic", "peft-lora"):
            if name in by_arm:
                base = by_arm[name]
                print(
                    f"recipe vs {name}: {recipe['tokens_per_second'] / base['tokens_per_second']:.2f}x real tokens/s, "
                    f"{recipe['peak_rss_mib'] / base['peak_rss_mib']:.2f}x peak memory, "
                    f"val loss {recipe['eval_loss'] - base['eval_loss']:+.4f}"
                )
    if "recipe" in by_arm and "compiled" in by_arm:
        after = len(by_arm["recipe"]["step_seconds"]) - args.warmup_steps
        print(
            f"compiled vs recipe over the {after} steps after the first {args.warmup_steps}: "
            f"{by_arm['recipe']['seconds_after_warmup'] / by_arm['compiled']['seconds_after_warmup']:.2f}x speed; "
            f"first {args.warmup_steps} steps {sum(by_arm['compiled']['step_seconds'][: args.warmup_steps]):.0f} s "
            f"against {sum(by_arm['recipe']['step_seconds'][: args.warmup_steps]):.0f} s"
        )
    print(
        f"(% matmul: {results[0]['flop_per_token'] / 1e6:.0f} MFLOP per real token x tok/s over the higher measured "
        f"matmul rate of the arm's dtype, fp32 {rates['fp32']:.1f} / bf16 {rates['bf16']:.1f} GFLOP/s; validation on "
        f"{results[0]['validation_examples']} held-out examples)"
    )


if __name__ == "__main__":
    main()
