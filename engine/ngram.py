"""Draft tokens by prompt lookup: the tokens that followed the last time the row's latest n-gram
appeared in its own prompt or output (TGI's `--speculate`, vLLM's `ngram` with
`prompt_lookup_min/max`).

Each row keeps an index from every n-gram of its tokens (n in min..max) to where it last ended,
grown by the tokens it gains, so a proposal costs one dictionary look-up per n, whatever the
length of the prompt. The longest n that matches wins (fewer, better drafts); among its
occurrences the latest, which in repetitive output is the one being repeated.
"""
from __future__ import annotations

from collections.abc import Sequence


class NgramDrafter:
    """One row's n-gram index over its token ids (prompt, then output)."""

    def __init__(self, smallest: int, largest: int):
        if not 1 <= smallest <= largest:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min <= max, got {smallest}..{largest}")
        self.smallest, self.largest = smallest, largest
        self._ends: dict[tuple[int, ...], int] = {}  # n-gram -> the index just past its latest occurrence
        self._indexed = 0  # tokens[:_indexed] have each of their n-grams with a successor indexed

    def propose(self, tokens: Sequence[int], count: int) -> tuple[int, ...]:
        """Up to `count` tokens that followed the latest earlier occurrence of the longest
        suffix n-gram of `tokens` (empty: no match)."""
        if count <= 0:
            return ()
        self._extend(tokens)
        length = len(tokens)
        for n in range(min(self.largest, length - 1), self.smallest - 1, -1):
            end = self._ends.get(tuple(tokens[length - n:]))
            if end is not None:
                return tuple(tokens[end : min(end + count, length)])
        return ()

    def _extend(self, tokens: Sequence[int]) -> None:
        """Index the n-grams that now have a successor: those ending before the last token."""
        last = len(tokens) - 1  # an n-gram ending at `last` has nothing after it yet
        for end in range(max(self._indexed, self.smallest), last + 1):
            for n in range(self.smallest, min(self.largest, end) + 1):
                self._ends[tuple(tokens[end - n : end])] = end
        self._indexed = max(self._indexed, last + 1)
