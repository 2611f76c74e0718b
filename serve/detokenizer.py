"""Incremental detokenization with stop strings.

Text is released only when it can no longer become part of a stop string and does not end in an incomplete
UTF-8 sequence, so a stream never shows text that the final answer would not contain.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; returns (text safe to send now, whether a stop string ended the text)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s)))
            if at != -1:
                self.text = text[:at]
                return self.flush(), True
        self.text = text
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        if end <= self.sent:
            return "", False
        delta, self.sent = text[self.sent : end], end
        return delta, False

    def flush(self) -> str:
        """Everything not yet sent (at the end of generation)."""
        delta = self.text[self.sent :] if len(self.text) > self.sent else ""
        self.sent = max(self.sent, len(self.text))
        return delta
