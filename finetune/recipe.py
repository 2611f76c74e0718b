"""The training recipe: LoRA on a frozen base, padding-free packing, bf16 where fast, the transformers Trainer."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.device import dtype_name
from core.errors import ConfigError
from core.schema.job import JobConfig
from finetune.attention import PACKED, use_packed_attention
from finetune.batching import TokenBudgetSampler
from finetune.compiled_layers import compile_layers
from finetune.cross_entropy import cross_entropy_sum
from finetune.lora_linear import fuse_lora_layers
from finetune.prepare import Tokenized

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

    from core.models import BaseModelRef
    from core.version import OpenedVersion


def skeleton(base: BaseModelRef, trust_remote_code: bool = False) -> PreTrainedModel:
    """The base model's modules on the meta device: their names and types, without reading or allocating weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def lora_targets(model: torch.nn.Module, target_modules: str | list[str] | set[str]) -> set[str]:
    """The full names of the layers a LoRA `target_modules` value adapts on `model`, by peft's rules.

    `all-linear` is every linear layer but the output head; a list entry names a layer by its full name or a
    dotted suffix of it (`q_proj`, `self_attn.q_proj`); any other string is a regular expression over full names.
    Comparing these sets, not the spellings, is what tells whether two configs adapt the same layers.
    """
    from transformers.pytorch_utils import Conv1D

    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            output_embeddings = getattr(model, "get_output_embeddings", None)
            head = output_embeddings() if callable(output_embeddings) else None
            linear = (torch.nn.Linear, Conv1D)
            return {n for n, m in model.named_modules() if isinstance(m, linear) and m is not head}
        return {n for n, _ in model.named_modules() if n and re.fullmatch(target_modules, n)}
    wanted = set(target_modules)
    return {n for n, _ in model.named_modules() if n and (n in wanted or any(n.endswith("." + t) for t in wanted))}


def _layer_kinds(names: set[str]) -> str:
    """`q_proj, v_proj` for a set of full layer names: what a reader compares."""
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))


def warm_start_problems(cfg: JobConfig, adapter: dict[str, Any], model: torch.nn.Module, label: str) -> list[str]:
    """Where the job's `lora` section disagrees with the adapter `lora.init_from` continues; each problem names
    the field and both values. The shape (r, alpha, layers, biases) must match for the saved weights to load as
    they are; dropout is not part of the weights, so the job's own applies.

    `target_modules` compare by the layers they adapt on this base (`lora_targets`): the adapter records its
    layers' full names, so a job's `all-linear` matches an adapter trained with `all-linear` or with an explicit
    list of every linear layer but the output head, and a job's list matches when it names the same layers.
    """
    theirs = f"the adapter of {label} (lora.init_from)"
    problems = []
    if str(adapter.get("peft_type", "LORA")).upper() != "LORA":
        return [f"lora.init_from: {label} holds a {adapter.get('peft_type')} adapter, not LoRA"]
    for field, key in (("r", "r"), ("alpha", "lora_alpha"), ("bias", "bias")):
        mine, saved = getattr(cfg.lora, field), adapter.get(key)
        if mine != saved:
            problems.append(
                f"lora.{field}: this job sets {mine}, but {theirs} was trained with {saved}; "
                f"set lora.{field} to {saved} to continue it"
            )
    saved_targets = adapter.get("target_modules") or []
    have, want = lora_targets(model, saved_targets), lora_targets(model, cfg.lora.target_modules)
    if have != want:
        mine = cfg.lora.target_modules
        spelt = mine if isinstance(mine, str) else "[" + ", ".join(mine) + "]"
        hint = "all-linear" if have == lora_targets(model, "all-linear") else f"[{_layer_kinds(have)}]"
        problems.append(
            f"lora.target_modules: this job's {spelt} adapts {len(want)} layers ({_layer_kinds(want) or 'none'}), "
            f"but {theirs} adapts {len(have)} ({_layer_kinds(have) or 'none'}); set lora.target_modules to {hint}"
        )
    return problems


def saved_adapter_config(version: OpenedVersion) -> dict[str, Any]:
    """The version's `adapter_config.json` as peft wrote it."""
    try:
        return dict(json.loads((version.adapter_path / "adapter_config.json").read_text()))
    except (OSError, ValueError):
        raise ConfigError([f"lora.init_from: {version.label} has no readable adapter_config.json"]) from None


def attach_lora(model: PreTrainedModel, cfg: JobConfig, init: OpenedVersion | None = None) -> PeftModel:
    """A fresh LoRA adapter on `model`, or with `init` (the version `lora.init_from` names, checked against the
    job by `finetune.job.check`) that version's adapter, loaded trainable so training continues it."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if cfg.lora.init_from is not None and init is None:
        raise ValueError(f"lora.init_from is {cfg.lora.init_from!r}: pass the version finetune.job.check opened")
    if cfg.model.quantization != "none":
        model = prepare_model_for_kbit_training(model, cfg.training.gradient_checkpointing)
    if init is not None:
        # Checked again on the loaded model: a sweep trial reuses one check but may vary the LoRA shape.
        problems = warm_start_problems(cfg, saved_adapter_config(init), model, init.label)
        if problems:
            raise ConfigError(problems)
        log.info("lora: starting from %s", init.label)
        # The adapter's own config (its checked shape, and any option tuneops does not set), with the job's dropout.
        saved = LoraConfig.from_pretrained(str(init.adapter_path))
        saved.lora_dropout = cfg.lora.dropout
        saved.task_type = "CAUSAL_LM"
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            return PeftModel.from_pretrained(
                model, init.adapter_path, is_trainable=True, config=saved, autocast_adapter_dtype=True
            )
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        bias=cfg.lora.bias,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads the model's deprecated `is_gradient_checkpointing` property itself; nothing to change here.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        # Adapters stay in fp32 while the frozen base runs in bf16: the bf16 matmuls are the speed, fp32 the accuracy.
        return get_peft_model(model, lora, autocast_adapter_dtype=True)


def to_dataset(rows: list[Tokenized]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "labels": [r.labels for r in rows]})


def collator(cfg: JobConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if cfg.training.packing:
        # One row per micro-batch, examples kept apart by position_ids (the Trainer sets use_cache=False).
        return DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)


def _checkpointing_arg(arguments: type) -> str:
    """Newer transformers call `gradient_checkpointing` `activation_checkpointing` and warn on the old name."""
    names = {f.name for f in dataclasses.fields(arguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def training_arguments(cfg: JobConfig, output_dir: Path, device: torch.device, dtype: torch.dtype, has_eval: bool):
    from transformers import TrainingArguments

    t = cfg.training
    eval_on = has_eval
    checkpointing: dict[str, Any] = {_checkpointing_arg(TrainingArguments): t.gradient_checkpointing}
    return TrainingArguments(
        **checkpointing,
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=dtype_name(dtype) == "bf16",
        fp16=dtype_name(dtype) == "fp16",
        use_cpu=device.type == "cpu",
        eval_strategy="steps" if eval_on else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=eval_on and t.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if eval_on else None,
        greater_is_better=False if eval_on else None,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        seed=t.seed,
        data_seed=t.seed,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        ddp_backend="gloo" if device.type == "cpu" and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
    )


@functools.cache
def _fused_cross_entropy() -> Any:
    """Liger's fused linear + cross-entropy (CUDA, Triton) when `liger-kernel` is installed, else None."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # an installed but broken liger (no Triton, wrong torch) leaves the plain loss
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def fused_loss_applies(model: Any, device: torch.device) -> bool:
    """Fused linear + cross-entropy runs on CUDA only, for models whose head is a plain `lm_head` Linear."""
    if device.type != "cuda" or _fused_cross_entropy() is None:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(base, "lm_head", None)
    return isinstance(head, torch.nn.Linear) and hasattr(base, "model") and getattr(head, "bias", None) is None


def _fused_loss(model: Any, forward: dict[str, Any], keep: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed loss at `keep` from the last hidden states and the head's weight, the logits never materialised."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(**forward, use_cache=False).last_hidden_state[0, keep]
    out = _fused_cross_entropy()(base.lm_head.weight, hidden, targets)
    loss = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)  # newer Liger may return (loss, extras)
    return loss.float()


def trained_logits_loss(model: Any, inputs: dict[str, Any], num_items: Any = None) -> tuple[torch.Tensor, Any]:
    """Causal-LM loss computing logits only at positions whose next token is trained.

    The 49k-vocabulary head is a fifth of a small model's step, and most packed tokens are prompt tokens; a
    packed micro-batch is one row, so the kept positions are one index vector for `logits_to_keep`. On CUDA with
    Liger installed the head and the loss are one fused kernel (the outputs are then None: no logits exist).
    """
    labels = inputs["labels"]
    keep = (labels[0, 1:] != -100).nonzero().squeeze(-1)
    # Without a cache transformers reads example boundaries from position_ids; with one it attends across them.
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    if fused_loss_applies(model, labels.device):
        loss = _fused_loss(model, forward, keep, labels[0, keep + 1])
        outputs = None
    else:
        outputs = model(**forward, use_cache=False, logits_to_keep=keep)
        # squeeze, not [0]: its backward is a view, where selecting row 0 zero-fills a gradient of every logit
        loss = cross_entropy_sum(outputs.logits.squeeze(0), labels[0, keep + 1])
    return loss / (num_items if num_items is not None else max(1, keep.numel())), outputs


def _adapter_inputs_uncast(model: Any, mixed_precision: bool) -> Any:
    """Under bf16/fp16 autocast, let the fp32 adapters take their bf16 inputs as they are.

    peft casts each adapter's input up to the adapter's fp32 and autocast casts it straight back down for the
    matmul: two copies of every adapted layer's input per forward, ~10% of a CPU training step, for the same
    numbers. Outside autocast the cast is needed (a bf16 input and an fp32 weight do not multiply), so this holds
    only around the Trainer's autocast steps.
    """
    if not mixed_precision:
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def _trainer_class() -> type:
    from torch.utils.data import DataLoader
    from transformers import Trainer

    class PackedTrainer(Trainer):
        """The Trainer with `trained_logits_loss` for packed (single-row) micro-batches, and token-budget rows."""

        tokens_per_batch: int | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            labels = inputs.get("labels")
            if labels is None or labels.shape[0] != 1 or "position_ids" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if return_outputs and fused_loss_applies(model, labels.device):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # logits wanted
            loss, outputs = trained_logits_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as the Trainer scales its own token-averaged loss
            return (loss, outputs) if return_outputs else loss

        def training_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            with _adapter_inputs_uncast(self.model, self.args.bf16 or self.args.fp16):
                return super().training_step(*args, **kwargs)

        def prediction_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            with _adapter_inputs_uncast(self.model, self.args.bf16 or self.args.fp16):
                return super().prediction_step(*args, **kwargs)

        def get_train_dataloader(self) -> DataLoader:
            if self.tokens_per_batch is None or self.train_dataset is None:
                return super().get_train_dataloader()
            lengths = [len(ids) for ids in self.train_dataset["input_ids"]]
            sampler = TokenBudgetSampler(lengths, self.tokens_per_batch, self.args.data_seed or self.args.seed)
            loader = DataLoader(
                self.train_dataset,
                batch_sampler=sampler,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )
            return self.accelerator.prepare(loader)

    return PackedTrainer


def make_trainer(
    cfg: JobConfig,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Tokenized],
    validation: list[Tokenized],
    output_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    callbacks: list[TrainerCallback],
) -> Trainer:
    from transformers import EarlyStoppingCallback, PrinterCallback, Trainer

    args = training_arguments(cfg, output_dir, device, dtype, has_eval=bool(validation))
    if cfg.training.early_stopping_patience is not None and validation:
        callbacks = [*callbacks, EarlyStoppingCallback(cfg.training.early_stopping_patience)]
    data_collator = collator(cfg, tokenizer)
    attention = "not packed: the model's own attention over padded batches"
    if cfg.training.packing:
        attention = use_packed_attention(model, device, dtype)
        if attention.startswith(PACKED):
            # The example boundaries travel with the batch, read once per forward instead of once per layer.
            data_collator.return_flash_attn_kwargs = True
        if fused_loss_applies(model, device):
            log.info("loss: fused linear + cross-entropy (Liger); no logits materialised")
    if device.type == "cpu" and (fused := fuse_lora_layers(model)):
        log.info("lora: %d layers add their low-rank product inside the base matmul (CPU)", fused)
    if cfg.training.compile:
        log.info("compile: %d decoder layers, compiled on the first steps", compile_layers(model))
    trainer_class = _trainer_class() if cfg.training.packing else Trainer
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=to_dataset(train),
        eval_dataset=to_dataset(validation) if validation else None,
        data_collator=data_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    if cfg.training.packing:
        trainer.tokens_per_batch = cfg.training.tokens_per_batch
    trainer.attention = attention  # what attention runs, for the run's tags
    return trainer
