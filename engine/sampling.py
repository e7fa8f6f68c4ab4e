"""Choosing the next token for a whole batch at once, each row with its own settings.

As in TGI's "heterogeneous" processors, every setting becomes one tensor for the whole batch
(`# [B, 1]`), built only when some row needs that processor, so a greedy-only batch pays for
one argmax and one log-softmax. A `BatchSampler` is rebuilt whenever the batch composition
changes; the per-request state (the seeded generator) lives in `RequestSampler`, so a request
draws the same tokens whichever batch it shares.

Order: TGI's watermark (watermarked rows only: `engine.watermark`, first as in TGI), OpenAI's
logit bias (added to the model's logits), then as transformers and TGI apply them: repetition
penalty, frequency penalty, OpenAI's presence and frequency penalties (over the generated tokens
only), the grammar mask (rows with a grammar only), then (sampled rows only) temperature, top-k,
top-p, typical-p. The grammar mask comes before the warpers, as in TGI: a
top-k or top-p filter applied first could keep only tokens the grammar forbids. The logprobs
reported are those of the masked distribution.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from engine.grammar import GrammarMatcher, allocate_bitmask, apply_token_bitmask, fill_bitmasks
from engine.params import SamplingParams
from engine.watermark import Watermark

FILTERED = -float("inf")


class RequestSampler:
    """One request's sampling state: its settings, when sampling a generator seeded once, and
    its grammar's matcher when the output is constrained."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu",
                 grammar: GrammarMatcher | None = None, prompt_len: int = 0):
        self.params = params
        self.grammar = grammar
        self.prompt_len = prompt_len  # where its history's generated tokens begin
        self.generator: torch.Generator | None = None
        if not params.is_greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)


@dataclass
class SampleOutput:
    next_ids: Tensor  # [B] long
    logprobs: Tensor  # [B] float: log-softmax of the chosen token under the processed logits
    top_ids: Tensor | None = None  # [B, top_n] long, None when top_n == 0
    top_logprobs: Tensor | None = None  # [B, top_n] float


class BatchSampler:
    """The batch's settings as tensors; `__call__` turns logits into the next token of each row."""

    def __init__(self, rows: Sequence[RequestSampler], device: torch.device | str = "cpu",
                 watermark: Watermark | None = None):
        self.rows = list(rows)
        self.device = torch.device(device)
        params = [row.params for row in self.rows]
        self.sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        self.watermark = watermark or Watermark()
        self.watermarked_rows = [i for i, p in enumerate(params) if p.watermark]
        self._watermarked_index = (torch.tensor(self.watermarked_rows, dtype=torch.long, device=self.device)
                                   if self.watermarked_rows else None)

        def sampled(get: Callable[[SamplingParams], float | None]):
            """A warper's setting per row: greedy rows never use temperature/top-k/p."""
            return [None if p.is_greedy else get(p) for p in params]

        # [B, 1] each, or None when no row needs it.
        self.repetition = self._column([p.repetition_penalty for p in params], neutral=1.0)
        self.frequency = self._column([p.frequency_penalty for p in params], neutral=0.0)
        self.presence = self._column([p.presence_penalty for p in params], neutral=0.0)
        self.generated_frequency = self._column([p.generated_frequency_penalty for p in params], neutral=0.0)
        self.logit_bias = self._sparse_bias([p.logit_bias for p in params])
        self.temperature = self._column(sampled(lambda p: p.temperature), neutral=1.0)
        # Filters: a [B, 1] setting plus a [B, 1] mask of the rows that use it; the other rows
        # hold a placeholder and come out of the filter untouched.
        top_ks = sampled(lambda p: p.top_k)
        self.top_k, self.top_k_on = self._filter(top_ks, dtype=torch.long)
        # max(k) as a host int, so top-k never waits on the device to learn its width.
        self.largest_top_k = max((k for k in top_ks if k is not None), default=0)
        self.top_p, self.top_p_on = self._filter(sampled(lambda p: p.top_p))
        self.typical_p, self.typical_p_on = self._filter(sampled(lambda p: p.typical_p))
        # The rows with a grammar (their index tensor: None when it is every row); the bitmask
        # buffer is allocated at the first step.
        self.grammar_rows = [i for i, row in enumerate(self.rows) if row.grammar is not None]
        self._grammar_index = None
        if self.grammar_rows and len(self.grammar_rows) < len(self.rows):
            self._grammar_index = torch.tensor(self.grammar_rows, dtype=torch.long, device=self.device)
        self._bitmask: Tensor | None = None

    def _column(self, values: list, neutral: float) -> Tensor | None:
        """[B, 1] tensor of `values` (None → `neutral`), or None when every row is neutral."""
        if all(v is None or v == neutral for v in values):
            return None
        column = [neutral if v is None else v for v in values]
        return torch.tensor(column, dtype=torch.float32, device=self.device).unsqueeze(1)

    def _filter(self, values: list, dtype=torch.float32) -> tuple[Tensor | None, Tensor | None]:
        """([B, 1] setting, [B, 1] bool mask of rows using it), or (None, None) if no row does."""
        if all(v is None for v in values):
            return None, None
        column = [1 if v is None else v for v in values]
        setting = torch.tensor(column, dtype=dtype, device=self.device).unsqueeze(1)
        enabled = torch.tensor([v is not None for v in values], device=self.device).unsqueeze(1)
        return setting, enabled

    def _sparse_bias(self, biases: list[tuple]) -> tuple[Tensor, Tensor, Tensor] | None:
        """(rows [N], token ids [N], biases [N]) of every row's logit_bias, or None if none has one."""
        entries = [(row, token_id, bias) for row, pairs in enumerate(biases) for token_id, bias in pairs]
        if not entries:
            return None
        rows, ids, values = zip(*entries)
        return (torch.tensor(rows, device=self.device), torch.tensor(ids, device=self.device),
                torch.tensor(values, dtype=torch.float32, device=self.device))

    @property
    def needs_history(self) -> bool:
        return any(x is not None for x in (self.repetition, self.frequency, self.presence, self.generated_frequency))

    def process(self, logits: Tensor, history: Sequence[Sequence[int]] = ()) -> Tensor:
        """The logits [B, V] after every row's watermark, bias, penalties and (sampled rows only) warpers."""
        if self.watermarked_rows:  # seeded by each row's previous token (its prompt's last, at first)
            logits = self.watermark.apply(logits, self._watermarked_index,
                                          [history[i][-1] for i in self.watermarked_rows])
        if self.logit_bias is not None:
            logits = add_logit_bias(logits, *self.logit_bias)
        if self.needs_history:
            logits = self._penalize(logits, history)
        if self.grammar_rows:
            logits = self._constrain(logits)
        if self.sampled_rows:
            logits = self._warp(logits)
        return logits

    def __call__(
        self, logits: Tensor, history: Sequence[Sequence[int]] = (), top_n: int = 0
    ) -> SampleOutput:
        """`logits` [B, V] float32; `history` holds each row's prompt + generated ids."""
        logits = self.process(logits, history)
        logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
        next_ids = logits.argmax(dim=-1)  # [B]
        if self.sampled_rows:
            probs = logprobs.exp()  # [B, V]
            for i in self.sampled_rows:
                draw = torch.multinomial(probs[i], 1, generator=self.rows[i].generator)
                next_ids[i] = draw[0]
        chosen = logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)  # [B]
        if top_n == 0:
            return SampleOutput(next_ids, chosen)
        top_logprobs, top_ids = logprobs.topk(top_n, dim=-1)  # [B, top_n]
        return SampleOutput(next_ids, chosen, top_ids, top_logprobs)

    def _penalize(self, logits: Tensor, history: Sequence[Sequence[int]]) -> Tensor:
        if self.repetition is not None or self.frequency is not None:
            counts = token_counts(history, logits.shape[1], self.device)  # [B, V], prompt included
            if self.repetition is not None:
                penalized = torch.where(logits < 0, logits * self.repetition, logits / self.repetition)
                logits = torch.where(counts > 0, penalized, logits)
            if self.frequency is not None:
                logits = logits - self.frequency * counts
        if self.presence is not None or self.generated_frequency is not None:
            generated = [ids[row.prompt_len:] for ids, row in zip(history, self.rows)]
            counts = token_counts(generated, logits.shape[1], self.device)  # [B, V], output only
            if self.generated_frequency is not None:
                logits = logits - self.generated_frequency * counts
            if self.presence is not None:
                logits = logits - self.presence * (counts > 0)
        return logits

    def _constrain(self, logits: Tensor) -> Tensor:
        """Each grammar row keeps only the tokens its grammar allows next; other rows untouched."""
        matchers = [self.rows[i].grammar for i in self.grammar_rows]
        if self._bitmask is None:  # the tokenizer's width; a wider model vocabulary is masked off
            self._bitmask = allocate_bitmask(len(matchers), matchers[0].vocab_size)
        fill_bitmasks(matchers, self._bitmask)
        return apply_token_bitmask(logits, self._bitmask, self._grammar_index)

    def _warp(self, logits: Tensor) -> Tensor:
        if self.temperature is not None:
            logits = logits / self.temperature
        if self.top_k is not None:
            logits = top_k_filter(logits, self.top_k, self.top_k_on, self.largest_top_k)
        if self.top_p is not None:
            logits = top_p_filter(logits, self.top_p, self.top_p_on)
        if self.typical_p is not None:
            logits = typical_p_filter(logits, self.typical_p, self.typical_p_on)
        return logits


def token_counts(history: Sequence[Sequence[int]], vocab_size: int, device: torch.device) -> Tensor:
    """How often each token occurs in each row's history: [B, V] float32."""
    longest = max((len(ids) for ids in history), default=0)
    # Pad with an extra column `vocab_size` that is dropped afterwards.
    padded = torch.full((len(history), longest), vocab_size, dtype=torch.long)
    for i, ids in enumerate(history):
        padded[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    padded = padded.to(device)
    counts = torch.zeros(len(history), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab_size]


def add_logit_bias(logits: Tensor, rows: Tensor, ids: Tensor, biases: Tensor) -> Tensor:
    """logits[rows[i], ids[i]] += biases[i]; ids past the model's vocabulary are skipped."""
    inside = ids < logits.shape[1]
    return logits.index_put((rows[inside], ids[inside]), biases[inside], accumulate=True)


def top_k_filter(logits: Tensor, k: Tensor, enabled: Tensor, largest: int) -> Tensor:
    """Keep each row's `k` [B, 1] best tokens (ties at the k-th kept, as transformers does).

    `largest` is max(k): one topk of that width serves every row.
    """
    largest = min(largest, logits.shape[1])
    top_values = logits.topk(largest, dim=-1).values  # [B, largest]
    kth = top_values.gather(1, (k.clamp(max=largest) - 1))  # [B, 1]
    kth = kth.masked_fill(~enabled, FILTERED)
    return logits.masked_fill(logits < kth, FILTERED)


def top_p_filter(logits: Tensor, p: Tensor, enabled: Tensor) -> Tensor:
    """Keep the smallest set of best tokens whose probability reaches `p` [B, 1] (at least one)."""
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # ascending, [B, V]
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[:, -1] = False  # the best token always stays
    remove &= enabled
    return logits.masked_fill(remove.scatter(1, sorted_ids, remove), FILTERED)


def typical_p_filter(logits: Tensor, mass: Tensor, enabled: Tensor) -> Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy,
    until their probability reaches `mass` [B, 1] (at least one)."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
    entropy = -(logprobs * logprobs.exp()).nansum(-1, keepdim=True)  # [B, 1]
    shifted = (-logprobs - entropy).abs()
    sorted_scores, sorted_ids = shifted.sort(dim=-1)  # ascending distance from typical
    cumulative = logits.gather(-1, sorted_ids).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1, keepdim=True).clamp(max=logits.shape[1] - 1)  # [B, 1]
    remove = sorted_scores > sorted_scores.gather(1, last)
    remove[:, 0] = False  # the most typical token always stays
    remove &= enabled
    return logits.masked_fill(remove.scatter(1, sorted_ids, remove), FILTERED)
