"""Models with random weights for machines without model files (a lent GPU has none).

Throughput does not depend on weight values, only on the architecture, so the benchmarks can
build the default model's architecture (SmolLM2-135M) or a 1B-class one (Llama-3.2-1B) from a
config. `write_random_model` also saves a word-level tokenizer covering the whole vocabulary,
so `blitzscale serve` can load the directory like any model.
"""
from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = {
    # ~1 MB: for testbeds whose processes only need something to load and generate with
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # SmolLM2-135M-Instruct's config (the default model)
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    # Llama-3.2-1B's config
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001),
    # bench/serverless: three sizes of tiny model (~4, ~45 and ~210 MB in float32)
    "tiny-s": dict(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "tiny-m": dict(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "tiny-l": dict(vocab_size=4096, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                   num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}


def random_model(architecture: str, device: torch.device, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = LlamaConfig(**ARCHITECTURES[architecture])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def word_tokenizer(vocab_size: int):
    """Token i is the word `w<i>`: any id decodes, any text of such words encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", eos_token="w2", bos_token="w1")


def write_random_model(architecture: str, directory: Path, dtype: torch.dtype) -> Path:
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    model = random_model(architecture, torch.device("cpu"), dtype)
    model.save_pretrained(directory)
    word_tokenizer(model.config.vocab_size).save_pretrained(directory)
    return directory
