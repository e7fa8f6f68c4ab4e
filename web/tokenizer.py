"""The model's tokenizer, for counting and truncating input tokens (the `tokenizers` library
only: the web never loads torch or the model).

`model_id` is either a model directory holding `tokenizer.json`, or something the model
files module prepares (a GGUF file, a model id in the Hugging Face cache): it writes a
`tokenizer.json` that we read from `common.model_files.tokenizer_path(settings)`.
"""
from __future__ import annotations

import threading
from pathlib import Path

from tokenizers import Tokenizer

from common import model_files
from common.settings import Settings
from web.token_bytes import TokenBytes


class TokenizerUnavailable(RuntimeError):
    """The tokenizer file is not there (yet): a replica may still be preparing the model."""


def tokenizer_file(settings: Settings) -> Path:
    model = Path(settings.model_id).expanduser()
    candidate = model / "tokenizer.json"
    if model.is_dir() and candidate.is_file():
        return candidate
    return _prepared_tokenizer_file(settings)


def _prepared_tokenizer_file(settings: Settings) -> Path:
    return Path(model_files.tokenizer_path(settings))


def load_tokenizer(settings: Settings) -> Tokenizer:
    path = tokenizer_file(settings)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return Tokenizer.from_file(str(path))


class TokenCounter:
    """Encodes prompts as the model's tokenizer does by default (special tokens added).

    Loaded on first use and retried after a failure, so that the web can start before a
    replica has prepared the model files."""

    def __init__(self, settings: Settings, tokenizer: Tokenizer | None = None):
        self._settings = settings
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self._token_bytes: TokenBytes | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    try:
                        self._tokenizer = load_tokenizer(self._settings)
                    except Exception as error:  # missing file, or a file `tokenizers` cannot read
                        raise TokenizerUnavailable(str(error)) from error
        return self._tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encoding(self, text: str, add_special_tokens: bool = True):
        """The `tokenizers.Encoding` (ids, offsets, special-token mask) of `text`."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The token's raw bytes where the vocabulary gives them (see web.token_bytes)."""
        if self._token_bytes is None:
            self._token_bytes = TokenBytes(self.tokenizer)
        return self._token_bytes(token_id)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def warm(self) -> str | None:
        """Load now; returns the reason when the tokenizer is not available yet."""
        try:
            self.tokenizer
        except TokenizerUnavailable as error:
            return str(error)
        return None
