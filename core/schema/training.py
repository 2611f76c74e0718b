from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from core.schema.base import Section


class TrainingConfig(Section):
    output_dir: Path = Field(
        Path("outputs"),
        description="Folder of every job's runs: OUTPUT_DIR/JOB/runs/RUN_ID holds one run's checkpoints and final "
        "adapter, so jobs sharing the folder never share checkpoints.",
    )
    epochs: float = Field(3.0, gt=0, description="Passes over the training split (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 uses epochs.")
    batch_size: int = Field(
        8,
        ge=1,
        description="Examples per device per micro-batch (packed into one row); an optimizer step then counts "
        "batch_size x gradient_accumulation_steps examples. Ignored for training when tokens_per_batch is set.",
    )
    tokens_per_batch: int | None = Field(
        None,
        ge=16,
        description="Micro-batches by token budget instead of batch_size (needs packing): each packed row takes "
        "whole examples, in a seeded shuffled order, while their tokens fit the budget (an example longer than it "
        "trains alone), so a GPU gets rows big enough to fill it. An optimizer step is then "
        "gradient_accumulation_steps such rows: it counts tokens (about tokens_per_batch x "
        "gradient_accumulation_steps), not examples, and epochs and max_steps count those steps. The rows are cut "
        "once per run and visited in a new order each epoch. Evaluation still uses batch_size.",
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule after warm-up."
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    packing: bool = Field(True, description="Padding-free packing of examples into one row per micro-batch.")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long sequences.")
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer (the packed attention stays eager): the first "
        "steps compile for ~20-40 s (cached on the machine for later runs), then steps run 1.05-1.17x faster on an "
        "AMX CPU (no faster in fp32, nor in bf16 without AMX). Worth it for runs of many minutes. Needs a C++ "
        "compiler on CPU, triton on CUDA (checked before the job loads anything).",
    )
    eval_steps: int = Field(50, ge=1, description="Evaluate on the validation split every N steps.")
    save_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep at most this many checkpoints.")
    logging_steps: int = Field(5, ge=1, description="Log metrics every N steps.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better validation loss."
    )
    seed: int = Field(42, description="Seed of weights init, dropout and data order; same seed, same losses.")

    @model_validator(mode="after")
    def _budget_needs_packing(self) -> "TrainingConfig":
        if self.tokens_per_batch is not None and not self.packing:
            raise ValueError("tokens_per_batch needs packing: true (a token budget fills one packed row)")
        return self

    @model_validator(mode="after")
    def _save_on_eval(self) -> "TrainingConfig":
        if self.early_stopping_patience is not None and self.save_steps % self.eval_steps:
            raise ValueError("early stopping needs save_steps to be a multiple of eval_steps")
        return self
