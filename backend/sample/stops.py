"""Incremental stop-string matching: each step decodes only the newest tokens.

The text is built as the tokens come (the detokenizer trick of vLLM and TGI): decode the
last few tokens with and without the newest, and take the difference once it ends in a
whole character (byte-level tokens can split one). A stop string can only be completed by
the new text and the ``longest stop - 1`` characters before it, so only that tail is
searched. When a stop string is found, the row's final text is cut from one full decode
(the same text the old path built), so results do not depend on the incremental pieces.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, tokenizer, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""  # decoded so far (whole characters)
        self._prefix = 0  # tokens[prefix:read] were decoded last time, as context for the next
        self._read = 0

    def feed(self, tokens: Sequence[int]) -> bool:
        """``tokens``: the row's output so far, the newest last. True when a stop string
        now appears in the text."""
        if not self.stops:
            return False
        decode = self.tokenizer.decode
        before = decode(tokens[self._prefix : self._read], skip_special_tokens=True)
        after = decode(tokens[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False  # no whole new character yet
        new = after[len(before) :]
        self._prefix, self._read = self._read, len(tokens)
        tail_from = max(0, len(self.text) - self.longest + 1)
        self.text += new
        tail = self.text[tail_from:]
        return any(s in tail for s in self.stops)


def cut_at_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop string starts in ``text`` (-1: none)."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
