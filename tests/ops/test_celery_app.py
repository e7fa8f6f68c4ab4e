"""The Celery app comes from `make_celery(settings)`: nothing builds one at import time, a worker's
app carries the generate task, and Celery's own CLI finds `tasks.queue.cli_app`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from common.settings import Settings
from tasks.queue.celery_app import GENERATE_TASK, make_celery
from tasks.runtime import generate

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "REDIS_URL"} | {"PYTHONPATH": str(ROOT), **env}
    result = subprocess.run([sys.executable, "-c", code], env=environ, cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_importing_the_service_builds_no_celery_app():
    code = ("import celery._state as state\n"
            "import blitzscale.cli, tasks.runtime.generate, tasks.client.generation_client, tasks.control.cluster, web.app\n"
            "print(len(list(state._get_active_apps())))")
    assert _python(code) == "0"


def test_a_worker_app_has_the_generate_task_and_its_settings():
    app = make_celery(Settings(redis_url="redis://127.0.0.1:1/3", request_timeout=50))
    generate.register(app)
    app.finalize()
    assert GENERATE_TASK in app.tasks and app.tasks[GENERATE_TASK].run is generate.generate
    assert app.conf.broker_url == "redis://127.0.0.1:1/3"
    assert app.conf.broker_transport_options["visibility_timeout"] == 100
    assert GENERATE_TASK not in make_celery(Settings()).tasks  # only a worker registers it


def test_celerys_cli_module_builds_its_app_from_the_environment():
    code = "from tasks.queue.cli_app import app; print(app.conf.broker_url)"
    assert _python(code, REDIS_URL="redis://127.0.0.1:9/2") == "redis://127.0.0.1:9/2"
