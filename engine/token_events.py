"""A step's tokens as the requests' events: each row's token detokenized, its likeliest
alternatives, and on a request's first event its prompt's tokens with their logprobs
(`decoder_input_details`), gathered chunk by chunk as the prompt is prefilled. A token's own text
(alternatives, prompt tokens, special tokens) is decoded once per id: alternatives repeat from
step to step."""
from __future__ import annotations

import torch

from engine.outputs import Token, TokenEvent
from engine.scheduler import PrefillChunk
from engine.sequence import Sequence


class TokenEvents:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self._texts: dict[int, str] = {}  # one token's text, decoded once

    def emit(self, sequences: list[Sequence], ids: list[int], logprobs: list[float] | None,
             top_ids: list[list[int]] | None, top_logprobs: list[list[float]] | None) -> list[TokenEvent]:
        """One event per row (`sequences[row]` got `ids[row]`), recorded in its request."""
        events = []
        for row, sequence in enumerate(sequences):
            token_id = ids[row]
            special = token_id in self.special_ids
            text = sequence.detokenizer.step(token_id)
            shown = self.text(token_id) if special else text
            top = []
            if top_ids is not None and sequence.request.top_n_tokens:
                n = sequence.request.top_n_tokens
                top = [self.token(i, lp) for i, lp in zip(top_ids[row][:n], top_logprobs[row][:n])]
            prefill, prefill_top = _prompt_details(sequence)
            logprob = logprobs[row] if logprobs is not None and sequence.request.token_logprobs else None
            events.append(sequence.append(Token(token_id, shown, logprob, special), "" if special else text, top,
                                          prefill, prefill_top))
        return events

    def gather_prompt_logprobs(self, chunk: PrefillChunk, logits: torch.Tensor) -> None:
        """decoder_input_details: each prompt token with the logprob the model gave it (and its
        most likely alternatives when asked). A chunk's logits [C, V] at positions start..end-1
        score the prompt tokens start+1..end."""
        sequence = chunk.sequence
        ids = sequence.request.input_ids
        targets = ids[chunk.start + 1 : chunk.end + 1]
        target_ids = torch.tensor(targets, device=logits.device).view(-1, 1)
        logprobs = torch.log_softmax(logits[: len(targets)], dim=-1)  # [T, V]
        scored = logprobs.gather(1, target_ids).view(-1).tolist()
        if chunk.start == 0:
            sequence.prefill_tokens.append(self.token(ids[0], None))
            sequence.prefill_top_tokens.append(())
        sequence.prefill_tokens.extend(self.token(i, lp) for i, lp in zip(targets, scored))
        top_n = sequence.request.prefill_top_n_tokens
        if top_n:
            top_logprobs, top_ids = (t.tolist() for t in logprobs.topk(top_n, dim=-1))
            sequence.prefill_top_tokens.extend(tuple(self.token(i, lp) for i, lp in zip(row_ids, row_lps))
                                               for row_ids, row_lps in zip(top_ids, top_logprobs))

    def token(self, token_id: int, logprob: float | None) -> Token:
        return Token(token_id, self.text(token_id), logprob, token_id in self.special_ids)

    def text(self, token_id: int) -> str:
        """A token's own text, decoded once per id."""
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


def _prompt_details(sequence: Sequence) -> tuple[tuple | None, tuple | None]:
    """(prompt tokens, their alternatives) for the first token's event, when asked."""
    request = sequence.request
    if not request.prefill_logprobs or sequence.generated_count != 0:
        return None, None
    top = tuple(sequence.prefill_top_tokens) if request.prefill_top_n_tokens else None
    return tuple(sequence.prefill_tokens), top
