"""Constrained decoding: a request's grammar (JSON schema or regex) as a per-row token matcher.

The library is llguidance (see docs/structured-output.md for the measurements behind that).
A grammar is compiled once per (tokenizer, grammar) and cached by its hash; every request gets
its own cheap copy of the compiled matcher. Compiling happens where the request is built, on
the submitter's thread, never on the engine loop. At each step the loop fills one bitmask row
per grammar row (`fill_bitmasks`, the library's own thread pool) and masks those
rows' logits in one pass (`apply_token_bitmask`); rows without a grammar are not touched.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict

import llguidance
import llguidance.hf
import torch
from torch import Tensor

from engine.outputs import EngineError
from engine.params import Grammar

__all__ = ["Grammar", "GrammarError", "GrammarMatcher", "GrammarCompiler", "grammar_matcher", "fill_bitmasks",
           "allocate_bitmask", "apply_token_bitmask"]

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept per tokenizer
# Compact JSON with the usual spaces: flexible whitespace lets a weak model emit newlines forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(EngineError):
    """The grammar cannot be compiled (the web validates first, so this is rare)."""


def grammar_source(grammar: Grammar) -> str:
    """The grammar in llguidance's own form (raises ValueError on a value that is not JSON)."""
    if grammar.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(grammar.value)
    return llguidance.LLMatcher.grammar_from_json_schema(grammar.value, defaults=JSON_OPTIONS)


class GrammarMatcher:
    """One row's position in its grammar: fill its allowed tokens, advance by the sampled one."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: frozenset[int], vocab_size: int):
        self._matcher = matcher
        self._eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size  # the tokenizer's: its bitmask row covers that many tokens
        self.finished = False

    def advance(self, token_id: int) -> bool:
        """Take the row's sampled token; True once the grammar is complete (EOS taken where it
        was allowed, or nothing may follow) or failed (`error`): the row stops there."""
        if self.finished:
            return True
        if token_id in self._eos_token_ids:
            self.finished = True  # the mask allows EOS only where the grammar is complete
            return True
        self._matcher.consume_token(token_id)
        self.finished = self._matcher.is_stopped() or self._matcher.is_error()
        return self.finished

    def valid_prefix(self, tokens: tuple[int, ...]) -> int:
        """How many of `tokens` (draft tokens, without EOS) the grammar would take from here."""
        # An id past the tokenizer's vocabulary (a model's padded embedding) is never valid, and
        # llguidance would put this very matcher in error on it: cut the draft there first.
        known = next((j for j, token in enumerate(tokens) if not 0 <= token < self.vocab_size), len(tokens))
        if self.finished or not known:
            return 0
        return self._matcher.validate_tokens(list(tokens[:known]))

    def after(self, tokens: tuple[int, ...]) -> "GrammarMatcher":
        """A copy of this matcher advanced by `tokens` (a prefix `valid_prefix` allowed): the
        state a draft position is sampled in. The row's own matcher does not move."""
        copy = GrammarMatcher(self._matcher.deep_copy(), self._eos_token_ids, self.vocab_size)
        if tokens:
            copy._matcher.consume_tokens(list(tokens))
        return copy

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a lexer grown past the library's limits), else None."""
        return self._matcher.get_error() if self._matcher.is_error() else None

    @property
    def is_complete(self) -> bool:
        """Whether the output so far is a whole match (EOS is allowed now)."""
        return self.finished or self._matcher.is_accepting()


class GrammarCompiler:
    """Compiles grammars for one tokenizer, with an LRU cache keyed by the grammar's hash.
    Thread-safe: requests are built on many submitter threads at once."""

    def __init__(self, tokenizer, eos_token_ids: frozenset[int], cache_size: int = CACHE_SIZE):
        self.eos_token_ids = frozenset(eos_token_ids)
        eos = sorted(self.eos_token_ids) or None
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=eos)
        self.vocab_size = self._tokenizer.vocab_size
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def matcher(self, grammar: Grammar) -> GrammarMatcher:
        """A fresh matcher for one request (compiling the grammar unless it is cached)."""
        return GrammarMatcher(self._compiled(grammar).deep_copy(), self.eos_token_ids, self.vocab_size)

    def _compiled(self, grammar: Grammar) -> llguidance.LLMatcher:
        key = grammar.key
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile(grammar)  # outside the lock: other requests need not wait
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        try:
            source = grammar_source(grammar)
        except ValueError as error:
            raise GrammarError(f"grammar is not valid: {error}") from error
        compiled = llguidance.LLMatcher(self._tokenizer, source, log_level=0)
        if not compiled.is_error():
            # The first mask builds the lexer: here rather than on the loop, and a grammar too
            # complex for the library's limits fails its request now. Copies share the result.
            compiled.compute_bitmask()
        if compiled.is_error():
            raise GrammarError(f"grammar is not valid: {compiled.get_error()}")
        return compiled


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → {eos ids: compiler}
_compilers_lock = threading.Lock()


def compiler_for(tokenizer, eos_token_ids: frozenset[int]) -> GrammarCompiler:
    """The process's compiler for this tokenizer. Built at the first grammar request: reading the
    vocabulary takes 1–5 s for 49k tokens, mostly holding the GIL (the loop stalls once then).
    Not done at replica start, which would delay every scale-up for a feature few requests use."""
    with _compilers_lock:
        by_eos = _compilers.setdefault(tokenizer, {})
        compiler = by_eos.get(frozenset(eos_token_ids))
        if compiler is None:
            compiler = by_eos[frozenset(eos_token_ids)] = GrammarCompiler(tokenizer, eos_token_ids)
        return compiler


def grammar_matcher(grammar: Grammar, tokenizer, eos_token_ids: frozenset[int]) -> GrammarMatcher:
    """Compile (or find cached) and start one request's matcher: call on the submitter's thread."""
    return compiler_for(tokenizer, eos_token_ids).matcher(grammar)


_executor: llguidance.LLExecutor | None = None


def fill_bitmasks(matchers: list[GrammarMatcher], bitmask: Tensor) -> None:
    """Row j of `bitmask` [>= G, W] int32 (CPU) ← the allowed tokens of `matchers[j]`."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    assert bitmask.dtype == torch.int32 and bitmask.is_cpu and bitmask.is_contiguous()
    pairs = [(m._matcher, j) for j, m in enumerate(matchers)]
    # What llguidance.torch.fill_next_token_bitmask_par does, without importing torch.compile.
    _executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])


def allocate_bitmask(rows: int, vocab_size: int) -> Tensor:
    return torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)


def apply_token_bitmask(logits: Tensor, bitmask: Tensor, rows: Tensor | None = None) -> Tensor:
    """`logits` [B, V] with row `rows[j]` limited to the tokens set in `bitmask[j]`, as a copy;
    `rows` is a [G] long tensor on the logits' device, None when every row has a grammar. The
    other rows come out unchanged. Columns past the bitmask (a model vocabulary wider
    than the tokenizer's) are never allowed."""
    count = logits.shape[0] if rows is None else rows.shape[0]
    bias = token_bias(bitmask[:count], logits.shape[1], logits)  # [G, V]: 0 or -inf
    return logits + bias if rows is None else logits.index_add(0, rows, bias)


def token_bias(bitmask: Tensor, width: int, like: Tensor) -> Tensor:
    """[G, W] int32 bitmask → [G, width] additive bias: 0 where allowed, -inf elsewhere.

    Each byte of the bitmask looks up its 8 biases in a 256-row table: one gather, much faster
    than unpacking bits and a masked_fill (see bench/grammar_masks.py). Bit k of word w is
    token 32·w + k; the int32 words are little-endian, so byte b of word w is tokens 32·w + 8·b...
    """
    table = _bias_table(like.device, like.dtype)
    as_bytes = bitmask.to(like.device, non_blocking=True).view(torch.uint8).long()  # [G, 4W]
    bias = torch.nn.functional.embedding(as_bytes, table).view(bitmask.shape[0], -1)  # [G, 32W]
    if bias.shape[1] >= width:
        return bias[:, :width]
    padding = bias.new_full((bitmask.shape[0], width - bias.shape[1]), -float("inf"))
    return torch.cat([bias, padding], dim=1)


_bias_tables: dict = {}


def _bias_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    """[256, 8]: row `byte` holds 0 for its set bits and -inf for the others."""
    table = _bias_tables.get((device, dtype))
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = torch.zeros(256, 8, dtype=dtype).masked_fill(bits == 0, -float("inf")).to(device)
        _bias_tables[(device, dtype)] = table
    return table
