"""Which files of a hub repository a download takes (common.hub), without a hub."""
from __future__ import annotations

import pytest

from common.hub import ModelUnavailable, files_to_download, has_weights, is_hub_id

FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
         "pytorch_model.bin", "training_args.bin", "README.md", "onnx/model.onnx", "onnx/config.json",
         "original/consolidated.safetensors"]


def test_safetensors_at_the_top_and_the_support_files():
    chosen = files_to_download("org/m", FILES, weights=True)
    assert set(chosen) == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                           "chat_template.jinja", "model.safetensors.index.json",
                           "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert "model-00001-of-00002.safetensors" not in files_to_download("org/m", FILES, weights=False)


def test_only_bin_weights_are_refused_unless_asked_for():
    files = ["config.json", "pytorch_model.bin", "training_args.bin"]
    with pytest.raises(ModelUnavailable, match=r"only PyTorch \.bin files \(pytorch_model\.bin\).*--extension \.bin"):
        files_to_download("org/m", files, weights=True)
    assert files_to_download("org/m", files, weights=True, extension=".bin") == ["config.json", "pytorch_model.bin"]
    with pytest.raises(ModelUnavailable, match="no .safetensors weights at the top"):
        files_to_download("org/m", ["config.json", "weights/model.safetensors"], weights=True)


def test_a_hub_id_is_org_slash_name_and_not_a_local_path(tmp_path):
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("model.gguf") and not is_hub_id("./a/b")
    assert not is_hub_id("no-slash") and not is_hub_id("a/b/c")


def test_a_snapshot_has_weights_when_every_shard_is_there(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}')
    (tmp_path / "model-1.safetensors").write_bytes(b"x")
    assert not has_weights(tmp_path)
    (tmp_path / "model-2.safetensors").write_bytes(b"x")
    assert has_weights(tmp_path)
