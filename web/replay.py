"""The tokens a stream has sent, by index. After a failover the new run replays the request's
tokens from index 1 (same seed and input): a replayed token is dropped if it repeats the one sent,
and fails the stream if it does not (the client holds text the new run would contradict)."""
from __future__ import annotations

from common.protocol import FailureReason, StreamEvent
from web.errors import GenerationError, IncompleteGeneration

RERUN_DIVERGED = "the replica serving this stream stopped, and the replica that took over generated other tokens"


class RerunDiverged(GenerationError):
    reason = FailureReason.RERUN_DIVERGED

    def __init__(self):
        super().__init__(RERUN_DIVERGED, reason=FailureReason.RERUN_DIVERGED)


TOKENS_LOST = "the stream lost tokens on their way from the replica"


class TokensLost(IncompleteGeneration):
    """A token index past the next one: the ones between reached nobody (the relay goes on, right
    after a Redis outage, when a PUBLISH reaches nobody). Sending on would hide a hole in the text.
    The relay's own error for tokens it could not publish is this one too."""
    reason = FailureReason.PUBLISH_FAILED

    def __init__(self, expected: int, got: int):
        super().__init__(f"{TOKENS_LOST} (token {got} came after {expected - 1})")


class SentTokens:
    def __init__(self):
        self._ids: dict[int, int | None] = {}  # index -> token id sent
        self.last_index = 0

    def replayed(self, event: StreamEvent) -> bool:
        """True for a token sent already (a duplicate, or a re-run's replay): drop it; False for a
        new one (now counted as sent). Raises RerunDiverged when a replay differs from what was sent."""
        token_id = (event.token or {}).get("id")
        if event.index > self.last_index + 1:
            raise TokensLost(self.last_index + 1, event.index)
        if event.index > self.last_index:
            self._ids[event.index], self.last_index = token_id, event.index
            return False
        if self._ids.get(event.index) != token_id:
            raise RerunDiverged()
        return True
