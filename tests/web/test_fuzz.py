"""Property-based fuzzing of every documented route with schemathesis, from our own OpenAPI
document (/api-doc/openapi.json), through real Redis and a scripted replica: no input may give a
server error. Bounded (a few dozen examples per operation) so that it runs in seconds."""
from __future__ import annotations

import shutil
from collections import Counter

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, Phase, given
from hypothesis.errors import Unsatisfiable
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error

from common.settings import Settings
from tests.web.fake_replica import FakeReplica, reply
from web.app import create_app

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzzed_app(model_dir, redis_url, tmp_path_factory):
    chat_model = tmp_path_factory.mktemp("fuzz-model")  # with a chat template: chat requests can succeed
    shutil.copy(model_dir / "tokenizer.json", chat_model / "tokenizer.json")
    (chat_model / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }} {% endfor %}")
    settings = Settings(model_id=str(chat_model), redis_url=redis_url, max_input_tokens=10, max_total_tokens=20,
                        queue_timeout=3.0, replica_silence_timeout=3.0, keep_alive_interval=0.1)
    app = create_app(settings)
    with FakeReplica(redis_url, reply([" a", " b"])):
        yield app


def test_no_server_error(fuzzed_app):
    """Every operation in turn (schemathesis' own pytest fixture loader does not run on pytest 9)."""
    schema = schemathesis.openapi.from_wsgi("/api-doc/openapi.json", fuzzed_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 13  # TGI's routes, the OpenAI routes, /tokenize and /chat_tokenize
    calls = Counter()
    for operation in operations:
        for mode in GenerationMode:  # valid bodies, then invalid ones
            fuzz(operation, mode, calls)
    assert sum(calls.values()) >= len(operations) * 10, calls
    assert any(status == 200 for _, status in calls) and any(status == 422 for _, status in calls), calls


def fuzz(operation, mode: GenerationMode, calls: Counter) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(checks=[not_a_server_error])
        calls[(operation.label, response.status_code)] += 1

    try:
        run()
    except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
        assert mode is GenerationMode.NEGATIVE
