"""A malformed or out-of-range setting stops `blitzscale` with one line naming it, not a traceback."""
from __future__ import annotations

import pytest

from blitzscale.cli import main


@pytest.mark.parametrize("argv, env, named", [
    (["--speculate", "-1"], {}, "--speculate"),
    (["--speculate", "4", "--speculate-ngram-min", "5", "--speculate-ngram-max", "2"], {}, "--speculate-ngram-min"),
    ([], {"SPECULATE": "four"}, "SPECULATE"),
    ([], {"SPECULATE_NGRAM_MAX": "0"}, "--speculate-ngram-max"),
    # Huge: a verify step of 10^6 drafts a row, or an index of every 10^4-gram of each row (seconds
    # of the loop thread and gigabytes a row for one 2,000-token prompt), refused at start.
    (["--speculate", "1000000"], {}, "--speculate"),
    (["--speculate", "4", "--speculate-ngram-max", "10000"], {}, "--speculate-ngram-max"),
])
def test_a_bad_speculate_setting_is_one_line_naming_it(monkeypatch, argv, env, named):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        main(["worker", *argv])
    message = str(stopped.value.code)
    assert named in message and "\n" not in message


def test_the_limits_are_the_engines():
    from common import settings
    from engine import speculative

    assert (settings.MAX_SPECULATE, settings.MAX_NGRAM) == (speculative.MAX_SPECULATE, speculative.MAX_NGRAM)


def test_a_missing_speculative_model_stops_the_start_in_one_line_naming_it(tiny_model_dir, tmp_path, capfd):
    """`serve` and `prepare` make the draft model loadable as they do the target (a hub id
    downloaded, a GGUF converted) before anything starts: a path that is not there is one line at
    start naming the flag, not every replica failing to load it later."""
    missing = str(tmp_path / "no-such-draft")
    code = main(["prepare", "--model-id", str(tiny_model_dir), "--speculate", "2", "--speculative-model", missing])
    assert code == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if "ERROR" in line or "error" in line.lower()]
    assert len(errors) == 1 and f"--speculative-model {missing}: " in errors[0]
