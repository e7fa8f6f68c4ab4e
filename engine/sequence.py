"""One request's state inside the engine: one object holds it all (no parallel lists)."""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import replace
from enum import IntEnum
from typing import TYPE_CHECKING

from engine.detokenize import IncrementalDetokenizer
from engine.grammar import GrammarError, grammar_matcher
from engine.outputs import EngineError, Finish, FinishReason, Token, TokenEvent
from engine.params import GenerationRequest
from engine.sampling import RequestSampler
from engine.stopping import StopChecker

if TYPE_CHECKING:  # a hint only: engine.speculative imports this module (it verifies Sequences)
    from engine.speculative import RowAcceptance


class SequenceStatus(IntEnum):
    """Ordered: every status after RUNNING is final."""

    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    CANCELLED = 3
    FAILED = 4

    @property
    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED


_END = object()  # sentinel closing a request's event queue


class RequestStream:
    """The submitter's handle on one request: iterate its events as they come, or `wait()`
    for the end and then read them all (one wake-up instead of one per token).
    Closing it early cancels the request."""

    def __init__(self, request_id: str, on_abandon):
        self.request_id = request_id
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = threading.Event()
        self._done = False
        self._on_abandon = on_abandon
        self.started_at: float | None = None  # wall clock (time.time) when its prefill began

    # engine side
    def put(self, item) -> None:
        self._queue.put(item)

    def end(self) -> None:
        """No event follows (called once the last one is known; again is harmless)."""
        if not self._ended.is_set():
            self._queue.put(_END)
            self._ended.set()

    # submitter side
    def wait(self, timeout: float | None = None) -> bool:
        return self._ended.wait(timeout)

    def __iter__(self):
        return self

    def __next__(self) -> TokenEvent:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, Exception):
            self._done = True
            raise item
        return item

    def close(self) -> None:
        if not self._ended.is_set():
            self._on_abandon(self.request_id)
        self._done = True


class Sequence:
    def __init__(self, request: GenerationRequest, tokenizer, eos_token_ids: frozenset[int], device, on_abandon=None):
        self.request = request
        self.status = SequenceStatus.WAITING
        self.arrived_at = time.monotonic()
        # Compiled here, on the submitter's thread (cached by the grammar's hash), never on the loop.
        self.grammar = grammar_matcher(request.grammar, tokenizer, eos_token_ids) if request.grammar else None
        self.sampler = RequestSampler(request.sampling, device, self.grammar, prompt_len=len(request.input_ids),
                                      logprobs=request.token_logprobs)
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.input_ids)
        self.stop_checker = StopChecker(request.stopping, eos_token_ids)
        self.token_ids: list[int] = list(request.input_ids)  # prompt + generated (penalties read it)
        self.text_parts: list[str] = []
        self.cancel_requested = False
        self.stream = RequestStream(request.request_id, on_abandon or (lambda _request_id: None))
        self.slot: int | None = None  # its KV slot while running (the slot table assigns it)
        self.kv_len = 0  # positions of its slot written so far (prompt chunks, then one per decode)
        self.cached_len = 0  # prompt positions found in the prefix cache, never prefilled
        self.prefill_tokens: list[Token] = []  # decoder_input_details, gathered chunk by chunk
        self.prefill_top_tokens: list[tuple[Token, ...]] = []  # their alternatives (prefill_top_n_tokens)
        self.speculation: RowAcceptance | None = None  # its drafting state, once it drafts (engine/speculative.py)
        self.skipped_tokens = 0  # tokens it emitted beyond the first of a verify step (accepted drafts)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.input_ids)

    @property
    def generated_count(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def remaining_tokens(self) -> int:
        return self.request.stopping.max_new_tokens - self.generated_count

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_prefilling(self) -> bool:
        return self.status is SequenceStatus.RUNNING and self.kv_len < self.prompt_len

    @property
    def is_decoding(self) -> bool:
        return self.status is SequenceStatus.RUNNING and self.kv_len >= self.prompt_len

    def append(self, token: Token, text: str, top_tokens, prefill, prefill_top=None) -> TokenEvent:
        """Record a generated token, decide whether to stop, emit its event (the stream is
        ended by the engine once the step's listeners have seen the event)."""
        self.token_ids.append(token.id)
        self.text_parts.append(text)
        if self.grammar is not None:  # a token the grammar forbids (logprob -inf) is no alternative
            top_tokens = [t for t in top_tokens if t.logprob != -math.inf]
        reason = self.stop_checker.check(token.id, text)
        grammar_error = None
        if self.grammar is not None and self.grammar.advance(token.id):
            grammar_error = self.grammar.error
            if reason is None and grammar_error is None:
                reason = FinishReason.EOS_TOKEN  # the grammar is complete: only EOS could follow
        finish = None
        if reason is not None:
            held_back = self.detokenizer.flush()  # half a character at the very end
            if held_back:
                self.text_parts.append(held_back)
                if not token.special:  # keep "token texts join to generated_text" true
                    token = replace(token, text=token.text + held_back)
            finish = Finish(reason, "".join(self.text_parts), self.generated_count, self.cached_len,
                            self.skipped_tokens)
            self.status = SequenceStatus.FINISHED
        event = TokenEvent(self.request_id, self.generated_count, token, tuple(top_tokens), prefill, prefill_top, finish)
        self.stream.put(event)
        if grammar_error is not None and finish is None:  # the row leaves at this step's end
            self.fail(GrammarError(f"the grammar failed: {grammar_error.strip().splitlines()[0]}"))
        return event

    def fail(self, error: EngineError) -> None:
        self.status = SequenceStatus.CANCELLED if self.cancel_requested else SequenceStatus.FAILED
        self.stream.put(error)
        self.stream.end()
