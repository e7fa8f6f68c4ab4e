"""Speculative decoding: which rows get draft tokens this step, and what a verify step accepts.

A decode row with k drafts goes through the forward as k + 1 tokens (its last token, then the
drafts) and gets k + 1 logits rows; each of them is sampled exactly as plain decoding would
sample that position had the drafts before it been accepted (its history, grammar state and
draw counter are those of that position). The row accepts its drafts while the token sampled
equals the draft, and takes the first token that differs as well: every token it emits is the
one plain decoding gives for the same logits, greedy or sampled, and a seeded row draws the
same tokens with or without speculation, alone or in any batch. (For a drafter that proposes
one token, accepting when the draw equals it is rejection sampling with acceptance p(draft):
the target distribution is kept exactly.) The KV written for rejected drafts lies past the
row's new length and is overwritten by its next step: the rollback is a number, not a copy.

It pays or it steps aside: a row whose drafts were mostly rejected lately stops drafting for a
while, and drafts about as many as its recent runs earned (`RowAcceptance`), and a batch
verifies only when the tokens its rows expect (from their own recent acceptance) beat the cost of a verify step in plain steps, measured per batch size
on this machine (`SpeculationGate`).
Drafts come per row (n-grams, `engine/ngram.py`) or, with a draft model, for the whole batch at
once (`BatchDrafter`, `engine/draft_model.py`): then the gate decides before drafting, since
drafting costs the draft model's forwards.
See docs/engine.md ("Speculative decoding").
"""
from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as AbcSequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.ngram import NgramDrafter
from engine.sampling import RequestSampler
from engine.sequence import Sequence

log = logging.getLogger(__name__)


# Bounds a setting can ask for: a verify step scores rows x (drafts + 1) positions outside the
# prefill token budget, and the n-gram index holds every n-gram up to the largest n of each row
# (n = 256 took 4 s of the loop thread and 0.5 GB for one 2,000-token prompt).
MAX_SPECULATE = 64
MAX_NGRAM = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    tokens: int = 0  # TGI's --speculate: drafts per row per step (0: off)
    ngram_min: int = 2  # vLLM's prompt_lookup_min
    ngram_max: int = 4  # vLLM's prompt_lookup_max
    min_acceptance: float = 0.25  # a row whose recent acceptance falls below this rests
    rest_steps: int = 16  # how long it rests the first time; each rest in a row doubles it (to 16×)

    def __post_init__(self):
        if not 0 <= self.tokens <= MAX_SPECULATE:
            raise ValueError(f"speculate must be in 0..{MAX_SPECULATE}, got {self.tokens}")
        if self.tokens and not 1 <= self.ngram_min <= self.ngram_max <= MAX_NGRAM:
            raise ValueError(f"speculative n-gram sizes must satisfy 1 <= min <= max <= {MAX_NGRAM}, "
                             f"got {self.ngram_min}..{self.ngram_max}")

    @property
    def enabled(self) -> bool:
        return self.tokens > 0


class Drafter(Protocol):
    """What proposes a row's drafts: `engine.ngram.NgramDrafter`, or any object made per row
    by `Speculator.new_drafter` (tests use an oracle)."""

    def propose(self, tokens: list[int], count: int) -> tuple[int, ...]: ...


class BatchDrafter(Protocol):
    """What drafts for a whole decode batch at once (`engine.draft_model.DraftModel`): up to
    counts[r] drafts for row r, with the per-row state `new_row` made (kept as the row's drafter)."""

    name: str
    steady: bool  # its last drafting cost a typical step's forwards (no long catch-up)

    def new_row(self, sequence: Sequence) -> object: ...

    def propose(self, rows: list[Sequence], counts: list[int]) -> list[tuple[int, ...]]: ...


@dataclass
class RowAcceptance:
    """A row's drafting state: its drafter, how well its drafts did lately, and how many it
    drafts next (`length`)."""

    drafter: Drafter
    # Moving average of accepted / drafted, per verify; a new row starts at even odds, so that a
    # row of open-ended text stops paying for drafts after one or two misses, not four.
    rate: float = 0.5
    resting: int = 0  # steps left before it drafts again
    rests: int = 0  # rests since its drafts last paid: open-ended text drafts less and less often
    # Drafts it asks for next (0: the configured most, at first): 2 more after a fully accepted
    # draft, 1 fewer after a rejection (transformers' assisted-generation heuristic). A verify
    # step's cost grows with its positions where the device is busy (a large batch, a CPU
    # without packed weights: docs/engine.md), so a row drafts about what its runs earn.
    length: int = 0

    def record(self, drafted: int, accepted: int, config: SpeculativeConfig) -> None:
        self.rate = 0.5 * self.rate + 0.5 * (accepted / drafted)
        self.length = next_draft_length(self.length or config.tokens, drafted, accepted, config.tokens)
        if self.rate < config.min_acceptance:
            self.resting = config.rest_steps << min(self.rests, 4)
            self.rests += 1
            self.rate = config.min_acceptance  # back on probation after the rest, not condemned
        elif accepted:
            self.rests = 0


def next_draft_length(length: int, drafted: int, accepted: int, most: int) -> int:
    """A row's next draft length after `accepted` of its `drafted` drafts (asked: `length`)."""
    return min(most, length + 2) if accepted == drafted else max(1, length - 1)


def accepted_tokens(sampled: list[int], drafts: tuple[int, ...]) -> list[int]:
    """The tokens a row emits: `sampled[j]` is the token sampled after drafts[:j]; they stand
    while each equals the next draft, and the first that differs ends them (it is emitted)."""
    for j, draft in enumerate(drafts):
        if sampled[j] != draft:
            return sampled[: j + 1]
    return sampled[: len(drafts) + 1]


def batch_bucket(rows: int) -> int:
    """Batch sizes are measured in power-of-two buckets (1, 2, 4, ...)."""
    return 1 << max(0, math.ceil(math.log2(max(rows, 1))))


WINDOW = 5  # a step kind's cost is the median of its last 5 timings: one outlier never moves it


def _typical(samples: deque[float]) -> float:
    """The lower median: with two timings, a warm-up or a pause is outvoted by the other one."""
    return statistics.median_low(samples)


@dataclass
class _Bucket:
    plain: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))  # a plain step's seconds
    verify: dict[int, deque[float]] = field(default_factory=dict)  # drafts per row (bucketed) -> a verify step's
    logged: dict[int, float] = field(default_factory=dict)  # the ratios last logged
    steps: int = 0

    def cost(self, width: int) -> tuple[float, float] | None:
        """(a verify step's, a plain step's) typical seconds, or None until both were measured."""
        verify = self.verify.get(width)
        return (_typical(verify), _typical(self.plain)) if verify and self.plain else None


PAYOFF = 1.1  # a verify step must promise 10% more tokens than it costs: a near-even bet loses to noise


class SpeculationGate:
    """Whether a batch drafts this step: when the tokens its rows expect from their drafts (one
    each, plus each row's recent acceptance times its drafts) beat, by `PAYOFF`, what a verify
    step costs in plain steps: a ratio measured on this machine per batch-size bucket and per
    drafts a row (a CPU's multi-token matmul costs several one-token ones, a GPU's about one).
    A width not measured yet is tried; a bucket measures a plain step after its first verify
    step, and every `probe_every` steps takes one step of the kind it is not taking, so both
    timings follow a machine that gets busier. Each timing is the median of its last `WINDOW`:
    one slow step (a warm-up, a pause) is outvoted at the next probe, never averaged in. Each
    ratio is logged when it is first known and whenever it moves by a quarter."""

    def __init__(self, probe_every: int = 64):
        self.probe_every = probe_every
        self._buckets: dict[int, _Bucket] = {}

    def drafts(self, rows: int, expected_tokens: float, draft_tokens: int) -> bool:
        """`expected_tokens`: what the rows would emit by verifying their `draft_tokens` drafts
        (a plain step: `rows`)."""
        bucket = self._bucket(rows)
        if not bucket.plain:
            return not bucket.verify  # a verify step, then a plain one, measured
        ratio = self.cost_ratio(rows, draft_tokens)
        if ratio is None:
            return True  # this many drafts a row: measured now
        worth = expected_tokens > PAYOFF * rows * ratio
        bucket.steps += 1
        if bucket.steps % self.probe_every == 0:
            return not worth  # the other kind, measured again
        return worth

    def observe(self, rows: int, seconds: float, draft_tokens: int = 0) -> None:
        """A decode step's seconds: a plain one (no drafts) or a verify one."""
        bucket = self._bucket(rows)
        if not draft_tokens:
            bucket.plain.append(seconds)
            return
        width = _width(rows, draft_tokens)
        bucket.verify.setdefault(width, deque(maxlen=WINDOW)).append(seconds)
        cost = bucket.cost(width)
        if cost is None:
            return
        ratio, logged = cost[0] / cost[1], bucket.logged.get(width)
        if logged is None or abs(ratio / logged - 1) > 0.25:
            bucket.logged[width] = ratio
            log.info("speculation: a verify step of up to %d drafts a row costs %.2f plain steps for batches of up "
                     "to %d rows (%.1f ms, %.1f ms): rows draft when they expect more than %.2f tokens each",
                     width, ratio, batch_bucket(rows), 1e3 * cost[0], 1e3 * cost[1],
                     PAYOFF * ratio)

    def cost_ratio(self, rows: int, draft_tokens: int) -> float | None:
        """A verify step's seconds over a plain step's, for this batch size and drafts (None: not
        measured yet)."""
        cost = self._bucket(rows).cost(_width(rows, draft_tokens))
        return None if cost is None else cost[0] / cost[1]

    def ratios(self) -> dict[str, float]:
        """"rows bucket x drafts a row" -> measured cost ratio (for logs and benchmarks)."""
        return {f"{size}x{width}": round(cost[0] / cost[1], 3) for size, b in sorted(self._buckets.items())
                for width in sorted(b.verify) if (cost := b.cost(width)) is not None}

    def _bucket(self, rows: int) -> _Bucket:
        return self._buckets.setdefault(batch_bucket(rows), _Bucket())


def _width(rows: int, draft_tokens: int) -> int:
    """Drafts a row, bucketed (1, 2, 4, 8, ...)."""
    return batch_bucket(-(-draft_tokens // rows))


class Speculator:
    """Drafts for a decode batch, and the per-position samplers that verify them."""

    def __init__(self, config: SpeculativeConfig, slot_length: int):
        self.config = config
        self.new_drafter: Callable[[Sequence], Drafter] = lambda _sequence: NgramDrafter(config.ngram_min,
                                                                                         config.ngram_max)
        self.batch_drafter: BatchDrafter | None = None  # set by `draft_with`
        self.slot_length = slot_length
        self.gate = SpeculationGate()
        self.drafts = 0  # verify rows with at least one draft, since start
        self.draft_tokens = 0
        self.accepted = 0

    def propose(self, rows: list[Sequence]) -> list[tuple[int, ...]] | None:
        """Each row's drafts (empty for a row without a match or resting), or None when no row
        drafts or they are not worth a verify step (`SpeculationGate`)."""
        if self.batch_drafter is not None:
            return self._propose_batched(rows)
        drafts = [self._draft(sequence) for sequence in rows]
        if not any(drafts):
            return None
        expected = sum(1 + sequence.speculation.rate * len(own) for sequence, own in zip(rows, drafts))
        return drafts if self.gate.drafts(len(rows), expected, sum(map(len, drafts))) else None

    @property
    def drafter_name(self) -> str:
        """What drafts: `ngram`, or the draft model's id."""
        return self.batch_drafter.name if self.batch_drafter is not None else "ngram"

    @property
    def timing_is_typical(self) -> bool:
        """Whether the last verify step's time is what such a step costs: not when a draft model
        caught rows up by a prompt or a rest's tokens (a prefill the gate must not charge to
        every step; it is paid once, when a row starts or comes back from a rest)."""
        return self.batch_drafter is None or self.batch_drafter.steady

    def draft_with(self, drafter: BatchDrafter) -> None:
        """Draft every step's rows together with `drafter` (a draft model) instead of per row."""
        self.batch_drafter = drafter
        self.new_drafter = drafter.new_row

    def _propose_batched(self, rows: list[Sequence]) -> list[tuple[int, ...]] | None:
        """A model's drafts cost its forwards, so the gate decides before drafting, on what the
        rows expect from the drafts they would ask for; the verify step it measures includes
        the drafting (engine/engine.py times both)."""
        counts = [self._count(sequence) for sequence in rows]
        if not any(counts):
            return None
        expected = sum(1 + sequence.speculation.rate * count for sequence, count in zip(rows, counts))
        if not self.gate.drafts(len(rows), expected, sum(counts)):
            return None
        proposed = self.batch_drafter.propose(rows, counts)
        drafts = [self._checked(sequence, own) for sequence, own in zip(rows, proposed)]
        return drafts if any(drafts) else None

    def _count(self, sequence: Sequence) -> int:
        """How many drafts the row may take this step (0: it rests, or has no room)."""
        state = sequence.speculation
        if state is None:
            state = sequence.speculation = RowAcceptance(self.new_drafter(sequence))
        if state.resting:
            state.resting -= 1
            return 0
        # Never past the last token it may emit, nor past its KV slot (draft j is written at kv_len + j).
        return max(0, min(state.length or self.config.tokens, sequence.remaining_tokens - 1,
                          self.slot_length - 1 - sequence.kv_len))

    def _draft(self, sequence: Sequence) -> tuple[int, ...]:
        count = self._count(sequence)
        if not count:
            return ()
        return self._checked(sequence, sequence.speculation.drafter.propose(sequence.token_ids, count))

    @staticmethod
    def _checked(sequence: Sequence, drafts: tuple[int, ...]) -> tuple[int, ...]:
        """Drafts cut at an EOS, and at the first token the row's grammar refuses."""
        eos = sequence.stop_checker.eos_token_ids
        for j, token in enumerate(drafts):
            if token in eos:  # nothing follows an EOS; a grammar row never drafts one (its mask decides)
                drafts = drafts[: j if sequence.grammar is not None else j + 1]
                break
        if sequence.grammar is not None:
            drafts = drafts[: sequence.grammar.valid_prefix(drafts)]
        return drafts

    def verify_rows(self, rows: list[Sequence], drafts: list[tuple[int, ...]]
                    ) -> tuple[list[RequestSampler], "PositionHistories"]:
        """One sampler row per position to verify (row r's last token, then each draft), each
        in the state plain decoding would reach there: its history, grammar and draw counter."""
        samplers = []
        for sequence, own in zip(rows, drafts):
            real = sequence.sampler
            for j in range(len(own) + 1):
                grammar = real.grammar if real.grammar is None or j == 0 else real.grammar.after(own[:j])
                position = RequestSampler(real.params, grammar=grammar, prompt_len=real.prompt_len,
                                          logprobs=real.logprobs)
                position.draws = real.draws + j
                samplers.append(position)
        return samplers, PositionHistories(rows, drafts)

    def record(self, sequence: Sequence, drafted: int, accepted: int, emitted: int) -> None:
        """A row's verify outcome: `accepted` of its `drafted` tokens matched, it emitted `emitted`."""
        if drafted:
            self.drafts += 1
            self.draft_tokens += drafted
            self.accepted += accepted
            sequence.speculation.record(drafted, accepted, self.config)
        if not sequence.sampler.params.is_greedy:
            sequence.sampler.draws += emitted  # its host counter, for the next sampler built


class PositionHistories(AbcSequence):
    """Each verified position's history (its row's tokens, then the drafts before it), built
    only when read: a batch sampler reads histories for penalties and watermarks alone, so a
    plain greedy row never copies its k + 1 histories."""

    def __init__(self, rows: list[Sequence], drafts: list[tuple[int, ...]]):
        self._at = [(sequence, own[:j]) for sequence, own in zip(rows, drafts) for j in range(len(own) + 1)]

    def __len__(self) -> int:
        return len(self._at)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        sequence, before = self._at[index]
        return sequence.token_ids + list(before) if before else sequence.token_ids
