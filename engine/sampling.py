"""Choosing the next token for a whole batch at once, each row with its own settings.

As in TGI's "heterogeneous" processors, every setting becomes one tensor for the whole batch
(`# [B, 1]`), built only when some row needs that processor, so a greedy-only batch pays for
one pass over the vocabulary (`engine.draw.summarize`). A `BatchSampler` is rebuilt whenever
the batch composition changes (its settings reach the device in one copy); between rebuilds it
keeps, on the device, what it needs from step to step (the penalties' token counts, each row's
draw number), updated in place from the tokens it samples, so a step needs nothing from the host.

Sampled rows draw by inverse transform, all rows in one set of kernels (`engine.draw`): the
row's k-th token is the first whose cumulative probability exceeds `uniform(seed, k)`, a
counter-based number (`engine.seeded_noise`), so a seeded request draws the same tokens
whatever batch it shares and no generator state is kept per request.

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

from engine.draw import VocabSummary, draw, first_argmax, summarize
from engine.grammar import GrammarMatcher, allocate_bitmask, apply_token_bitmask, fill_bitmasks
from engine.host_transfer import to_device
from engine.params import SamplingParams
from engine.seeded_noise import split_seed, uniform
from engine.watermark import Watermark

FILTERED = -float("inf")


class RequestSampler:
    """One request's sampling state: its settings, how many tokens it has drawn (the counter
    its seeded numbers are keyed by), its grammar's matcher when the output is constrained, and
    whether its tokens' logprobs are wanted."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu",
                 grammar: GrammarMatcher | None = None, prompt_len: int = 0, logprobs: bool = True):
        self.params = params
        self.grammar = grammar
        self.prompt_len = prompt_len  # where its history's generated tokens begin
        self.logprobs = logprobs
        self.draws = 0  # tokens drawn so far


@dataclass
class SampleOutput:
    next_ids: Tensor  # [B] long
    logprobs: Tensor | None  # [B] float: log-softmax of the chosen token under the processed logits
    # (None when no row wants it: a greedy batch then skips the softmax)
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
        self.grammar_rows = [i for i, row in enumerate(self.rows) if row.grammar is not None]
        # Every setting's column is laid into one host tensor first, so the whole batch's
        # settings reach the device in one (pinned, non-blocking) copy.
        self._host: list[list[float]] = []
        self._slices: dict[str, tuple[int, int]] = {}  # name -> (its row in `_host`, its length)
        self._stage(params)
        self._unpack(self._to_device())
        # max(k) as a host int, so top-k never waits on the device to learn its width.
        self.largest_top_k = max((p.top_k or 0 for p in params if not p.is_greedy), default=0)
        self.logit_bias = self._sparse_bias([p.logit_bias for p in params])
        self._all_sampled = len(self.sampled_rows) == len(self.rows)
        self._argmax_only = not self.sampled_rows and not any(row.logprobs for row in self.rows)
        self._bitmask: Tensor | None = None
        self._counts: Tensor | None = None  # [B, V] every row's prompt + output, once a penalty needs it
        self._generated: Tensor | None = None  # [B, V] its output only
        self._row_index = torch.arange(len(self.rows), device=self.device)
        # Top-p and typical-p read the tempered distribution; without them the temperature is
        # applied in the summary pass (top-k keeps the same tokens at any positive scale).
        defer = self.temperature is not None and self.top_p is None and self.typical_p is None
        self._inverse_temperature = 1 / self.temperature if defer else None  # [B, 1]

    def _stage(self, params: list[SamplingParams]) -> None:
        """Each setting some row needs, as a host column; the sampled rows' seeds and counters."""

        def sampled(get: Callable[[SamplingParams], float | None]):
            """A warper's setting per row: greedy rows never use temperature/top-k/p."""
            return [None if p.is_greedy else get(p) for p in params]

        self._column("repetition", [p.repetition_penalty for p in params], neutral=1.0)
        self._column("frequency", [p.frequency_penalty for p in params], neutral=0.0)
        self._column("presence", [p.presence_penalty for p in params], neutral=0.0)
        self._column("generated_frequency", [p.generated_frequency_penalty for p in params], neutral=0.0)
        self._column("temperature", sampled(lambda p: p.temperature), neutral=1.0)
        self._filter("top_k", sampled(lambda p: p.top_k))
        self._filter("top_p", sampled(lambda p: p.top_p))
        self._filter("typical_p", sampled(lambda p: p.typical_p))
        if self.sampled_rows:
            seeds = [split_seed(self.rows[i].params.seed) for i in self.sampled_rows]
            self._add("seed_low", [low for low, _ in seeds])
            self._add("seed_high", [high for _, high in seeds])
            self._add("draws", [self.rows[i].draws for i in self.sampled_rows])
            self._add("sampled_index", self.sampled_rows)
        if self.grammar_rows and len(self.grammar_rows) < len(self.rows):
            self._add("grammar_index", self.grammar_rows)
        if self.watermarked_rows:
            self._add("watermarked_index", self.watermarked_rows)

    def _unpack(self, columns: Tensor) -> None:
        """The staged columns, now on the device ([k, B] float64), as the sampler's tensors."""

        def column(name: str, dtype=torch.float32, unsqueeze: bool = True) -> Tensor | None:
            if name not in self._slices:
                return None
            index, length = self._slices[name]
            values = columns[index, :length].to(dtype)
            return values.unsqueeze(1) if unsqueeze else values

        # [B, 1] each, or None when no row needs it.
        self.repetition, self.frequency = column("repetition"), column("frequency")
        self.presence, self.generated_frequency = column("presence"), column("generated_frequency")
        self.temperature = column("temperature")
        # Filters: a [B, 1] setting plus a [B, 1] mask of the rows that use it; the other rows
        # hold a placeholder and come out of the filter untouched.
        self.top_k, self.top_k_on = column("top_k", torch.long), column("top_k_on", torch.bool)
        self.top_p, self.top_p_on = column("top_p"), column("top_p_on", torch.bool)
        self.typical_p, self.typical_p_on = column("typical_p"), column("typical_p_on", torch.bool)
        # Sampled rows [S]: their seeds' halves, their draw counters (advanced in place), their rows.
        self._seed_low, self._seed_high = column("seed_low", torch.long, False), column("seed_high", torch.long, False)
        self._draws, self._sampled_index = column("draws", torch.long, False), column("sampled_index", torch.long, False)
        self._grammar_index = column("grammar_index", torch.long, False)  # None: every row (or none) has one
        self._watermarked_index = column("watermarked_index", torch.long, False)

    # ---- construction: one host tensor of columns, one copy --------------------------------
    def _add(self, name: str, values: list) -> None:
        self._slices[name] = (len(self._host), len(values))
        self._host.append(list(values))

    def _column(self, name: str, values: list, neutral: float) -> None:
        """Adds `values` (None → `neutral`) unless every row is neutral."""
        if not all(v is None or v == neutral for v in values):
            self._add(name, [neutral if v is None else v for v in values])

    def _filter(self, name: str, values: list) -> None:
        """A filter's setting per row (1 where unused) and the mask of rows using it."""
        if all(v is None for v in values):
            return
        self._add(name, [1 if v is None else v for v in values])
        self._add(name + "_on", [v is not None for v in values])

    def _to_device(self) -> Tensor:
        """Every column as one [k, B] float64 tensor on the device (exact for the uint32 seed
        halves and the row indices too), in one copy."""
        width = max((len(c) for c in self._host), default=0)
        host = torch.zeros((len(self._host), width), dtype=torch.float64)
        for i, values in enumerate(self._host):
            host[i, : len(values)] = torch.tensor(values, dtype=torch.float64)
        return to_device(host, self.device)

    def _sparse_bias(self, biases: list[tuple]) -> tuple[Tensor, Tensor, Tensor] | None:
        """(rows [N], token ids [N], biases [N]) of every row's logit_bias, or None if none has one."""
        entries = [(row, token_id, bias) for row, pairs in enumerate(biases) for token_id, bias in pairs]
        if not entries:
            return None
        host = torch.tensor(entries, dtype=torch.float64).T.contiguous()  # [3, N]
        rows, ids, values = to_device(host, self.device)
        return rows.long(), ids.long(), values.float()

    # ---- the step ----------------------------------------------------------------------------
    @property
    def needs_history(self) -> bool:
        return any(x is not None for x in (self.repetition, self.frequency, self.presence, self.generated_frequency))

    @property
    def needs_host(self) -> bool:
        """Whether a step's processing reads host state that the previous step's tokens change
        (a grammar's matcher, a watermark's previous token): such a batch cannot run ahead."""
        return bool(self.grammar_rows or self.watermarked_rows)

    def process(self, logits: Tensor, history: Sequence[Sequence[int]] = ()) -> Tensor:
        """The logits [B, V] after every row's watermark, bias, penalties and (sampled rows only) warpers.
        `history` (each row's prompt + generated ids) is read the first time penalties need it;
        after that the sampler counts the tokens it samples itself."""
        logits, scale = self._process(logits, history)
        return logits if scale is None else logits * scale

    def _process(self, logits: Tensor, history: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor | None]:
        """`process`, less the temperature when no later warper needs it: (logits, 1 / temperature
        [B, 1] or None). The summary pass applies it then, saving a pass over the vocabulary."""
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
        return logits.contiguous(), self._inverse_temperature

    def __call__(
        self, logits: Tensor, history: Sequence[Sequence[int]] = (), top_n: int = 0
    ) -> SampleOutput:
        """`logits` [B, V] float32; `history` holds each row's prompt + generated ids (read once)."""
        logits, scale = self._process(logits, history)
        if self._argmax_only and top_n == 0:  # greedy rows whose logprobs nobody reads
            next_ids = first_argmax(logits)
            self._count(next_ids)
            return SampleOutput(next_ids, None)
        # One pass over the vocabulary (engine/draw.py): enough for argmax, draws and logprobs.
        summary = summarize(logits, scale, block_weights=bool(self.sampled_rows))
        next_ids = None if self._all_sampled else summary.argmax  # [B]
        if self.sampled_rows:
            next_ids = self._draw(summary, next_ids)
        chosen = summary.log_probability(logits.gather(1, next_ids.unsqueeze(1))).squeeze(1)  # [B]
        self._count(next_ids)
        if top_n == 0:
            return SampleOutput(next_ids, chosen)
        top_values, top_ids = logits.topk(top_n, dim=-1)  # [B, top_n]; a positive scale keeps the order
        return SampleOutput(next_ids, chosen, top_ids, summary.log_probability(top_values))

    def _draw(self, summary: VocabSummary, next_ids: Tensor | None) -> Tensor:
        """The sampled rows' tokens by inverse transform of their counter-based uniforms."""
        drawn = draw(summary, self._sampled_index, uniform(self._seed_low, self._seed_high, self._draws))
        self._draws.add_(1)
        for i in self.sampled_rows:  # the host's copy of each counter, for the next rebuild
            self.rows[i].draws += 1
        if self._all_sampled:
            return drawn
        return next_ids.index_copy(0, self._sampled_index, drawn)

    def _count(self, next_ids: Tensor) -> None:
        """The penalties' counts gain this step's tokens, in place on the device."""
        for counts in (self._counts, self._generated):
            if counts is not None:
                counts.index_put_((self._row_index, next_ids), torch.ones_like(next_ids, dtype=counts.dtype),
                                  accumulate=True)

    def _penalize(self, logits: Tensor, history: Sequence[Sequence[int]]) -> Tensor:
        vocab = logits.shape[1]
        if self.repetition is not None or self.frequency is not None:
            if self._counts is None:
                self._counts = token_counts(history, vocab, self.device)  # [B, V], prompt included
            counts = self._counts
            if self.repetition is not None:
                penalized = torch.where(logits < 0, logits * self.repetition, logits / self.repetition)
                logits = torch.where(counts > 0, penalized, logits)
            if self.frequency is not None:
                logits = logits - self.frequency * counts
        if self.presence is not None or self.generated_frequency is not None:
            if self._generated is None:
                generated = [ids[row.prompt_len:] for ids, row in zip(history, self.rows)]
                self._generated = token_counts(generated, vocab, self.device)  # [B, V], output only
            counts = self._generated
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
        if self.temperature is not None and self._inverse_temperature is None:
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
    padded = to_device(padded, device)
    counts = torch.zeros(len(history), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab_size]


def add_logit_bias(logits: Tensor, rows: Tensor, ids: Tensor, biases: Tensor) -> Tensor:
    """logits[rows[i], ids[i]] += biases[i]; ids past the model's vocabulary are skipped (they
    add 0 at the last column: no boolean indexing, which would wait for the device)."""
    inside = ids < logits.shape[1]
    return logits.index_put((rows, ids.clamp(max=logits.shape[1] - 1)), biases * inside, accumulate=True)


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
