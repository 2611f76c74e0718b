from pathlib import Path
from typing import Literal

from pydantic import Field

from core.schema.base import Section

Shape = Literal["auto", "chat", "instruction", "prompt_completion", "text"]


class ColumnMap(Section):
    """Which column holds each part of an example, when the file's names differ from the standard ones."""

    messages: str = Field("messages", description="Chat shape: list of {role, content} messages.")
    instruction: str = Field("instruction", description="Instruction shape: the task.")
    input: str = Field("input", description="Instruction shape: optional extra input appended to the task.")
    output: str = Field("output", description="Instruction shape: the answer to train on.")
    prompt: str = Field("prompt", description="Prompt/completion shape: the prompt.")
    completion: str = Field("completion", description="Prompt/completion shape: the completion to train on.")
    text: str = Field("text", description="Plain text shape: the whole text is trained on.")


class DataConfig(Section):
    path: Path = Field(
        Path("builtin:zaragoza-faq"),
        description="JSONL, JSON, CSV or Parquet file, a folder of them, a saved `datasets` folder, "
        "or `builtin:zaragoza-faq` for the embedded organisation FAQ.",
    )
    shape: Shape = Field("auto", description="Example shape; `auto` detects it from the column names.")
    columns: ColumnMap = Field(default_factory=ColumnMap, description="Column names for each part of an example.")
    system_prompt: str | None = Field(None, description="System message put before every non-chat example.")
    max_length: int = Field(512, ge=16, le=131072, description="Longest example in tokens, template included.")
    overlong: Literal["drop", "truncate"] = Field(
        "drop", description="What to do with an example longer than max_length."
    )
    validation_split: float = Field(
        0.1, ge=0.0, lt=1.0, description="Share of examples held out for validation and evaluation."
    )
    validation_path: Path | None = Field(None, description="Separate validation file instead of a split.")
    train_on_prompt: bool = Field(False, description="Count the loss on prompt tokens too, not only completions.")
    dedupe: bool = Field(True, description="Drop exact duplicate examples.")
    on_malformed: Literal["error", "skip"] = Field(
        "error", description="A row that cannot be parsed stops the job (`error`) or is dropped and reported."
    )
    max_examples: int | None = Field(None, ge=1, description="Use at most this many examples (after cleaning).")
    seed: int = Field(42, description="Seed of the train/validation split.")
