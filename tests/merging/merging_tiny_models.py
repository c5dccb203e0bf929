"""Tiny random Llama and LoRA adapters built locally (no network) for the merging tests."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype)


def save_base(path, dtype=torch.float32, max_shard_size=None):
    model = tiny_llama(dtype=dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def save_adapter(base_path, path, seed, r=4, alpha=8, targets=("q_proj", "v_proj"), use_rslora=False,
                 dtype=torch.float32):
    """A LoRA adapter with random (non-zero) A and B, saved with PEFT's own save_pretrained."""
    model = LlamaForCausalLM.from_pretrained(base_path)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora,
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.3).to(dtype)
    peft_model.peft_config["default"].base_model_name_or_path = str(base_path)
    peft_model.save_pretrained(path)
    return path
