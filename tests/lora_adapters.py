"""LoRA adapters made in the test by peft on the tiny random model: rank 8 on the attention and
MLP projections, random non-zero weights (peft's default B is zero, a no-op adapter)."""
from __future__ import annotations

from pathlib import Path

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapter(model_dir: str | Path, directory: str | Path, seed: int, rank: int = 8, alpha: int = 16,
                  targets: list[str] | None = None) -> Path:
    """Write a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or PROJECTIONS, lora_dropout=0.0)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                parameter.normal_(0.0, 0.3)
    peft_model.save_pretrained(directory)
    return Path(directory)


def merged_model(model_dir: str | Path, adapter_dir: str | Path):
    """peft's own answer: the base model with the adapter merged into its weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def greedy(model, input_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([input_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()
