"""Where the web finds the model's tokenizer, and how it counts tokens."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

import web.tokenizer
from common.settings import Settings
from web.tokenizer import TokenCounter, TokenizerUnavailable, tokenizer_file


def fake_model_files(monkeypatch, result):
    """Stand in for `common.model_files`: tokenizer_path returns `result`, or raises it."""

    def tokenizer_path(settings):
        if isinstance(result, Exception):
            raise result
        return result

    module = types.SimpleNamespace(tokenizer_path=tokenizer_path)
    monkeypatch.setattr(web.tokenizer, "model_files", module)


def test_model_directory(model_dir):
    settings = Settings(model_id=str(model_dir))
    assert tokenizer_file(settings) == Path(model_dir) / "tokenizer.json"
    assert TokenCounter(settings).encode("hello world paris") == [1, 2, 8]


def test_gguf_file_uses_the_prepared_tokenizer(model_dir, tmp_path, monkeypatch):
    fake_model_files(monkeypatch, Path(model_dir) / "tokenizer.json")
    settings = Settings(model_id=str(tmp_path / "model.Q4.gguf"))
    assert tokenizer_file(settings) == Path(model_dir) / "tokenizer.json"
    assert TokenCounter(settings).encode("the capital") == [3, 4]


def test_missing_tokenizer_is_reported_and_retried(model_dir, tmp_path, monkeypatch):
    fake_model_files(monkeypatch, FileNotFoundError("not prepared yet"))
    counter = TokenCounter(Settings(model_id=str(tmp_path / "model.gguf")))
    with pytest.raises(TokenizerUnavailable, match="not prepared yet"):
        counter.encode("hello")
    assert "not prepared yet" in counter.warm()
    fake_model_files(monkeypatch, Path(model_dir) / "tokenizer.json")
    assert counter.warm() is None and counter.encode("hello") == [1]


def test_special_tokens_are_added_as_the_tokenizer_does(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({"<s>": 0, "hi": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert TokenCounter(Settings(model_id=str(tmp_path))).encode("hi hi") == [0, 1, 1]


def test_the_web_never_imports_torch_transformers_or_the_engine(model_dir):
    """transformers comes in with the first chat request (its chat template), torch never."""
    code = (
        "import sys\n"
        "from common.settings import Settings\n"
        "from web.app import create_app\n"
        f"app = create_app(Settings(model_id={str(model_dir)!r}, redis_url='redis://127.0.0.1:1/0'))\n"
        "app.extensions['blitzscale'].tokens.encode('hello')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'engine'))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
        "try:\n"
        "    app.extensions['blitzscale'].chat_template.render([{'role': 'user', 'content': 'hello'}])\n"
        "except Exception as error:\n"
        "    assert 'template not found' in str(error), error\n"
        "assert 'transformers' in sys.modules\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'engine'))\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

