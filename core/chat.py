"""One chat rendering for training, evaluation and serving, so the template trained on is the one served."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]


def with_system(messages: list[Message], system_prompt: str | None) -> list[Message]:
    if system_prompt and not (messages and messages[0].get("role") == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return messages


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    add_generation_prompt: bool,
    chat_template: str | None = None,
) -> str:
    """Render messages to text with the model's chat template (or the one a version was trained with)."""
    kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
    if chat_template:
        kwargs["chat_template"] = chat_template
    text = tokenizer.apply_chat_template(messages, **kwargs)
    return str(text)


def prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of a chat prompt, ending where the assistant's answer starts."""
    text = render(
        tokenizer,
        with_system(messages, system_prompt),
        add_generation_prompt=True,
        chat_template=chat_template,
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
