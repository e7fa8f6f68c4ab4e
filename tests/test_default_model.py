"""tests.default_model.link_weights, the helper that shares the converted default model with a
test's own host cache: the files are the same inodes (no 0.5 GB copy), the tokenizer the web
prepared stays its own, the entry's remembered chunk manifest is not borrowed, and the shared
entry is never changed by what the test's cache does to its copy."""
from __future__ import annotations

import shutil

from common import model_files
from tests.default_model import link_weights


def test_the_weights_are_linked_in_beside_the_webs_own_tokenizer(tmp_path):
    entry = tmp_path / "home" / "models" / ("a" * 24)
    entry.mkdir(parents=True)
    for name, content in {"model.safetensors": b"weights", "config.json": b"{}", "tokenizer.json": b"shared",
                          ".manifest-xxh3_128-4194304.json": b"{}"}.items():
        (entry / name).write_bytes(content)
    cache = tmp_path / "test-cache"
    own = cache / "models" / entry.name
    own.mkdir(parents=True)
    (own / "tokenizer.json").write_bytes(b"the web's own")
    assert not model_files.entry_complete(own)

    assert link_weights(entry, cache) == own
    assert model_files.entry_complete(own)
    assert (own / "model.safetensors").stat().st_ino == (entry / "model.safetensors").stat().st_ino
    assert (own / "tokenizer.json").read_bytes() == b"the web's own"
    assert not (own / ".manifest-xxh3_128-4194304.json").exists()

    shutil.rmtree(own)  # the test's cache evicts its copy: the shared entry is whole
    assert model_files.entry_complete(entry) and (entry / "model.safetensors").read_bytes() == b"weights"
