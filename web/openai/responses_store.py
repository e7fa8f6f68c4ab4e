"""Stored /v1/responses answers: the response object and its conversation (chat messages), in Redis
under `stored_response_key`, expiring after `STORED_RESPONSE_TTL`. Each is owned by the API key
that made it (a SHA-256 of the bearer token presented, also when the service checks no key, so two
clients with different tokens never see each other's; requests with no token share one owner): a
request with another key finds nothing (404), as if it did not exist.

The store lives in Redis only, so every web process sees the same answers; a generation client
without a Redis connection has no store (each use is the queue's 503, as when Redis is down)."""
from __future__ import annotations

import functools
import hashlib
import json

import redis
from flask import current_app

from common.keys import stored_response_key
from common.protocol import FailureReason
from web.auth import presented_token
from web.errors import GenerationError
from web.openai.errors import OpenAIError
from web.service import current_service

STORED_RESPONSE_TTL = 7 * 24 * 3600  # seconds: long enough for an agent's session, bounded in Redis
_EXTENSION = "blitzscale.response_store"


class ResponseNotFound(OpenAIError):
    def __init__(self, response_id: str):
        super().__init__(f"Response with id '{response_id[:64]}' not found.", param="response_id", status=404)


def request_owner() -> str:
    """Who owns what this request stores: its API key, hashed (never stored as it is)."""
    return hashlib.sha256((presented_token() or "").encode("utf-8", "surrogatepass")).hexdigest()


def _redis_call(method):
    """Redis down: the queue's 503 (OpenAI's server_error), as for generation itself."""
    @functools.wraps(method)
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (redis.RedisError, OSError) as error:
            raise GenerationError(f"the response store is unavailable: {error}",
                                  reason=FailureReason.QUEUE_UNAVAILABLE) from error

    return call


class ResponseStore:
    def __init__(self, connection: redis.Redis | None):
        self._redis = connection

    @property
    def _connection(self) -> redis.Redis:
        if self._redis is None:
            raise redis.ConnectionError("the generation client has no Redis connection")
        return self._redis

    @_redis_call
    def put(self, owner: str, response: dict, messages: list[dict]) -> None:
        record = json.dumps({"owner": owner, "response": response, "messages": messages}, ensure_ascii=False)
        self._connection.set(stored_response_key(response["id"]), record, ex=STORED_RESPONSE_TTL)

    @_redis_call
    def get(self, owner: str, response_id: str) -> dict:
        """{"response", "messages"} of a response this owner stored; else ResponseNotFound."""
        raw = self._connection.get(stored_response_key(response_id))
        record = json.loads(raw) if raw else None
        if record is None or record["owner"] != owner:
            raise ResponseNotFound(response_id)
        return record

    @_redis_call
    def delete(self, owner: str, response_id: str) -> None:
        self.get(owner, response_id)
        self._connection.delete(stored_response_key(response_id))


def response_store() -> ResponseStore:
    """The app's store, made on first use from the generation client's Redis connection."""
    store = current_app.extensions.get(_EXTENSION)
    if store is None:
        connection = getattr(current_service().client, "redis", None)
        store = ResponseStore(connection if isinstance(connection, redis.Redis) else None)
        current_app.extensions[_EXTENSION] = store
    return store
