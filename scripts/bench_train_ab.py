"""A recipe part against what it replaced, in one process: alone, and inside training steps.

Training runs minutes apart drift on shared hosts by more than a part's few percent, so this script compares
two variants where the drift cannot reach them: alternating, in both orders, in one process.

  loss:       the trained positions' cross-entropy: `F.cross_entropy` (eager) against
              `finetune.cross_entropy.cross_entropy_sum` (one exponential per logit), and the compiled
              `F.cross_entropy` with --compiled;
  attention:  SDPA over a CPU row's examples padded into one batch against one unpadded call per example (fp32
              rows, and bf16 examples past MATH_UP_TO).

Each part is timed alone (forward + backward, the median of repeated calls), then inside the recipe's training
steps: the same --batches micro-batches of the default job (4 examples each) are trained with one variant, then
the other, for --rounds rounds, the order swapped every round. It prints the CPU, its flags and the load average.

    .venv/bin/python scripts/bench_train_ab.py loss
    .venv/bin/python scripts/bench_train_ab.py attention --config my-fp32-job.yaml
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def median_ms(call: Callable[[], Any], repeats: int = 9) -> float:
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2] * 1e3


def _pytorch_cross_entropy(logits: Any, targets: Any) -> Any:
    """The summed loss as the recipe computed it before `finetune.cross_entropy`."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float(), targets, reduction="sum")


def loss_alone(compiled: bool) -> None:
    import torch

    from finetune.cross_entropy import cross_entropy_sum

    variants = {"F.cross_entropy": _pytorch_cross_entropy, "one exponential": cross_entropy_sum}
    if compiled:
        variants["compiled F.cross_entropy"] = torch.compile(_pytorch_cross_entropy, dynamic=True)
    generator = torch.Generator().manual_seed(0)
    for positions in (267, 450, 900):
        logits = torch.randn(positions, 49152, generator=generator) * 3  # fp32, as accelerate hands it
        targets = torch.randint(0, 49152, (positions,), generator=generator)

        def step(fn: Callable[[Any, Any], Any], logits: Any = logits, targets: Any = targets) -> Callable[[], None]:
            return lambda: fn(logits.detach().requires_grad_(), targets).backward()

        timings = {name: median_ms(step(fn)) for name, fn in variants.items()}
        print(f"loss, {positions} positions x 49152, fp32: " + ", ".join(f"{n} {t:.1f} ms" for n, t in timings.items()))


def attention_alone(dtype: Any) -> None:
    import torch

    import finetune.attention as attention

    rows = [[64, 98, 130, 190], [60, 70, 200, 180, 90, 100, 130, 150], [210, 260, 300]]
    if dtype != torch.float32:  # examples up to MATH_UP_TO take the matmul path either way
        rows = [[210, 260, 300], [230, 380, 300, 250]]
    for lengths in rows:
        total = sum(lengths)
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, h, total, 64, generator=generator).to(dtype) for h in (9, 3, 3))
        cu = torch.tensor([0, *itertools.accumulate(lengths)])
        timings = {}
        for name, per_example in (("padded batch", False), ("per example", True)):

            def step(per_example: bool = per_example, qkv: tuple = (q, k, v), cu: Any = cu) -> None:
                grads = [t.detach().requires_grad_() for t in qkv]
                with _sdpa_per_example(per_example):
                    attention._padded_causal(*grads, cu, None, True).float().sum().backward()

            timings[name] = median_ms(step)
        print(f"attention {lengths}, {dtype}: " + ", ".join(f"{n} {t:.1f} ms" for n, t in timings.items()))


@contextlib.contextmanager
def _sdpa_per_example(on: bool) -> Iterator[None]:
    """Within it, SDPA takes one example per call on CPUs (the recipe, `on`) or one padded batch (before)."""
    import finetune.attention as attention

    saved = attention._batches

    def batches(lengths: list[int], heads: int, in_matmuls: bool, sdpa_per_example: bool = False) -> Any:
        return saved(lengths, heads, in_matmuls, sdpa_per_example and on)

    attention._batches = batches
    try:
        yield
    finally:
        attention._batches = saved


@contextlib.contextmanager
def _one_exponential_loss(on: bool) -> Iterator[None]:
    """Within it, the recipe's loss is `cross_entropy_sum` (`on`) or PyTorch's `F.cross_entropy` (before)."""
    import finetune.recipe as recipe

    saved = recipe.cross_entropy_sum
    recipe.cross_entropy_sum = saved if on else _pytorch_cross_entropy
    try:
        yield
    finally:
        recipe.cross_entropy_sum = saved


VARIANTS = {"loss": _one_exponential_loss, "attention": _sdpa_per_example}


def in_training(part: str, config: Path, batches: int, rounds: int) -> None:
    from bench_train import build_trainer

    from core.config import load_config
    from core.device import choose_device
    from core.schema.job import JobConfig
    from finetune.job import check

    out = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    cfg = load_config(JobConfig, config, [f"training.output_dir={out}", "training.batch_size=4"])
    checked = check(cfg)
    trainer, dtype = build_trainer(
        "recipe", cfg, checked, checked.data.train[: 4 * batches], out, choose_device("auto")
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 1
    rows = list(itertools.islice(trainer.get_train_dataloader(), batches))
    model = trainer.model
    model.train()

    def train(new: bool) -> float:
        with VARIANTS[part](new):
            t0 = time.perf_counter()
            for row in rows:
                trainer.training_step(model, row)
            seconds = time.perf_counter() - t0
        model.zero_grad()
        return seconds

    train(False), train(True)  # warm both
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for r in range(rounds):
        for new in (False, True) if r % 2 == 0 else (True, False):
            seconds[new].append(train(new))
    print(f"{part} in training, {batches} micro-batches of 4 examples, {dtype}, {rounds} rounds:")
    print("  before: " + " ".join(f"{s:.2f}" for s in seconds[False]) + " s")
    print("  recipe: " + " ".join(f"{s:.2f}" for s in seconds[True]) + " s")
    print(f"  recipe speed / before: {sum(seconds[False]) / sum(seconds[True]):.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("loss", "attention"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--batches", type=int, default=6, help="micro-batches per timed pass")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--compiled", action="store_true", help="loss: the compiled F.cross_entropy too")
    args = parser.parse_args()
    import torch
    from bench_train import cpu_description

    from core.config import load_config
    from core.device import choose_device, choose_dtype
    from core.schema.job import JobConfig

    cpu = cpu_description()
    print(f"cpu: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags'])}; load {os.getloadavg()}")
    if args.part == "loss":
        loss_alone(args.compiled)
    else:
        dtype = choose_dtype(load_config(JobConfig, args.config).model.dtype, choose_device("auto"))
        attention_alone(dtype)
        if dtype != torch.float32:
            attention_alone(torch.float32)
    in_training(args.part, args.config, args.batches, args.rounds)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
