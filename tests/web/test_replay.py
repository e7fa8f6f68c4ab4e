"""A failover's re-run replays a stream's tokens from index 1: the same ones are dropped, another
one fails the stream (the client holds text the new run would contradict)."""
from __future__ import annotations

import pytest

from common.protocol import EVENT_TOKEN, StreamEvent
from web.replay import RerunDiverged, SentTokens


def token(index: int, token_id: int) -> StreamEvent:
    return StreamEvent(kind=EVENT_TOKEN, index=index, token={"id": token_id, "text": f" t{token_id}"})


def test_a_replay_of_the_same_tokens_is_dropped_and_the_run_goes_on():
    sent = SentTokens()
    assert [sent.replayed(token(i, 10 + i)) for i in (1, 2)] == [False, False]
    assert [sent.replayed(token(i, 10 + i)) for i in (1, 2)] == [True, True]  # the re-run repeats them
    assert sent.replayed(token(3, 13)) is False  # then goes on
    assert sent.last_index == 3


def test_a_replay_that_differs_fails_the_stream():
    sent = SentTokens()
    sent.replayed(token(1, 11))
    sent.replayed(token(2, 12))
    with pytest.raises(RerunDiverged) as raised:
        sent.replayed(token(2, 99))
    assert raised.value.reason == "rerun_diverged" and raised.value.status == 424
