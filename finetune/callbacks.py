"""Trainer callbacks: per-step metrics to MLflow in batches, and a progress bar with loss and tokens/s."""

from __future__ import annotations

import time
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

METRIC_NAMES = {
    "loss": "train_loss",
    "eval_loss": "eval_loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "epoch": "epoch",
}


class Throughput(TrainerCallback):
    """Adds real (non-padding) tokens per second to each log, from the Trainer's token counter."""

    def __init__(self) -> None:
        self.last_tokens = 0
        self.last_time = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.last_tokens, self.last_time = state.num_input_tokens_seen, time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw: Any):  # type: ignore[no-untyped-def]
        if logs is None or "loss" not in logs:
            return
        now = time.perf_counter()
        seen = state.num_input_tokens_seen
        if now > self.last_time and seen > self.last_tokens:
            logs["tokens_per_second"] = (seen - self.last_tokens) / (now - self.last_time)
        self.last_tokens, self.last_time = seen, now


class MlflowMetrics(TrainerCallback):
    """Logs each Trainer log line to one MLflow run with a single batched call (only on the main process)."""

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id

    def on_log(self, args, state, control, logs=None, **kw: Any):  # type: ignore[no-untyped-def]
        from mlflow.entities import Metric

        if not state.is_world_process_zero or not logs:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(METRIC_NAMES.get(k, k), float(v), now, state.global_step)
            for k, v in logs.items()
            if isinstance(v, int | float) and (k in METRIC_NAMES or k == "tokens_per_second" or k.startswith("eval_"))
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics, synchronous=True)


class Progress(TrainerCallback):
    """One bar over optimizer steps, showing the latest loss, validation loss and tokens/s."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kw: Any):  # type: ignore[no-untyped-def]
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step")

    def on_step_end(self, args, state, control, **kw: Any):  # type: ignore[no-untyped-def]
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw: Any):  # type: ignore[no-untyped-def]
        if self.bar is None or not logs:
            return
        for key, label, fmt in [
            ("loss", "loss", "{:.3f}"),
            ("eval_loss", "val", "{:.3f}"),
            ("tokens_per_second", "tok/s", "{:.0f}"),
        ]:
            if key in logs:
                self.postfix[label] = fmt.format(logs[key])
        self.bar.set_postfix(self.postfix, refresh=True)

    def on_train_end(self, args, state, control, **kw: Any):  # type: ignore[no-untyped-def]
        if self.bar is not None:
            self.bar.close()
            self.bar = None
