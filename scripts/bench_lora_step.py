"""One decode step of the gateway's LoRA set, in process: one version against two versions in one batch.

Loads SmolLM2-135M-Instruct (the embedded default, in the dtype core.device picks), two random rank-16 LoRA
adapters on every linear layer (the default job's shape), prefills `--rows` rows of `--context` tokens, then
times decode steps alternately with every row on the merged version and with half the rows on the other
version, so both see the same cache lengths. Reported: the median wall time of each, and their ratio, for the
mixed-batch correction computed inside each layer's matmul (`widened`, the CPU default) and as a separate
product added after it (`added`, the GPU default). Linear weights are packed as the gateway packs them
(`core.packed_linear`, bf16 on CPU) unless --no-pack. Run it on a quiet machine; the load average is printed.

    .venv/bin/python scripts/bench_lora_step.py [--rows 16] [--context 64] [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_train import cpu_description  # noqa: E402 (scripts/ is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--context", type=int, default=64, help="prompt tokens per row before the timed steps")
    parser.add_argument("--steps", type=int, default=60, help="timed decode steps per mode (half of them mixed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-pack", action="store_true", help="plain F.linear weights (the gateway packs bf16)")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache

    from core.device import choose_dtype, dtype_name
    from core.models import load_causal_lm, resolve_base_model
    from core.packed_linear import pack_linears
    from serve.lora import LoraSet

    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    dtype = choose_dtype("auto", cpu)
    base = resolve_base_model("smollm2-135m-instruct").path
    cpu_info = cpu_description()
    print(
        f"CPU: {cpu_info['model']}; flags {' '.join(cpu_info['flags'])}; dtype {dtype_name(dtype)}; "
        f"threads {args.threads}; load average before {os.getloadavg()[0]:.2f}"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(load_causal_lm(base, cpu, torch.float32), lora).save_pretrained(work / name)
    ids = torch.randint(0, 40000, (args.rows, args.context), generator=torch.Generator().manual_seed(0))
    single = ["a"] * args.rows
    mixed = ["a"] * (args.rows // 2) + ["b"] * (args.rows - args.rows // 2)
    for widen in (True, False):
        model = load_causal_lm(base, cpu, dtype).eval()
        packed = 0 if args.no_pack else pack_linears(model)
        loras = LoraSet(model, widen=widen)
        for name in ("a", "b"):
            loras.add(name, work / name)
        for _ in range(args.repeats):
            times: dict[bool, list[float]] = {False: [], True: []}
            with torch.inference_mode():
                cache = DynamicCache()
                loras.plan(single, count=False)
                out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                for step in range(args.steps):
                    is_mixed = bool(step % 2)
                    loras.plan(mixed if is_mixed else single, count=False)
                    t0 = time.perf_counter()
                    out = model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
                    times[is_mixed].append(time.perf_counter() - t0)
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                loras.clear()
            one, two = (statistics.median(times[k]) * 1000 for k in (False, True))
            print(
                f"{'widened' if widen else 'added':8s} {'packed' if packed else 'plain':6s} "
                f"one version {one:6.1f} ms  two versions {two:6.1f} ms  "
                f"ratio {one / two:.3f}  (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
