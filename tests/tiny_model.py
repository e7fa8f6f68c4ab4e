"""A tiny random Llama model with a real byte-level BPE tokenizer, made in the test session.

Byte-level BPE trained on a few sentences keeps multi-byte characters split across tokens
(only the bytes of rare characters are in the vocabulary), which the detokenizer tests need.
"""
from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Hello, world! This is a tiny model for tests of a text generation service.",
    "Once upon a time there was a queue, a worker and a stream of tokens.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { }",
    "Continuous batching lets requests join and leave between decode steps.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|endoftext|>"
# ChatML, as SmolLM2's own template writes it (without its default system message), with tools
# as Hermes-style templates (Qwen2.5's, ...) render them: the functions in a system message, an
# assistant's calls as <tool_call> JSON, tool results in `tool` messages.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nYou may call these functions:\\n' }}"
    "{% for tool in tools %}{{ tool.function | tojson }}{{ '\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message.tool_calls %}{{ '<|im_start|>assistant\\n' }}{% for call in message.tool_calls %}"
    "{{ '<tool_call>' }}{{ call.function | tojson }}{{ '</tool_call>\\n' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(directory: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN
    )
    fast.chat_template = CHAT_TEMPLATE  # saved beside the tokenizer, for /v1/chat/completions
    fast.save_pretrained(directory)
    return len(fast)


def build_tiny_model(directory: str | Path, seed: int = 0) -> Path:
    """Write config, weights (safetensors) and tokenizer of a ~1 MB Llama to `directory`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size = build_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        # Large init spreads the logits, so greedy choices are far from ties and stay equal
        # between a lone request and the same request inside a padded batch.
        initializer_range=0.5,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    _make_eos_reachable(model, directory)
    model.save_pretrained(directory, safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=0).save_pretrained(directory)
    return directory


EOS_PROMPT = "Hello, world!"
EOS_AFTER = 4  # greedy decoding of EOS_PROMPT emits EOS as its 4th token


def _make_eos_reachable(model, directory: Path) -> None:
    """Random weights almost never pick EOS; point the EOS row of the output layer at the
    hidden state that follows EOS_PROMPT + 3 greedy tokens, so EOS tests have a sure case."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = torch.tensor([tokenizer(EOS_PROMPT).input_ids])
    with torch.no_grad():
        for _ in range(EOS_AFTER - 1):
            next_id = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        hidden = model.model(ids).last_hidden_state[0, -1]
        # Just above the best logit there: EOS wins at that step and rarely elsewhere.
        target_logit = model.lm_head(hidden).max() + 0.5
        model.lm_head.weight[tokenizer.eos_token_id] = hidden * (target_logit / hidden.norm() ** 2)


if __name__ == "__main__":
    import sys

    print(build_tiny_model(sys.argv[1]))
