"""Build a tiny LoRA for the tiny transformer, saved the way diffusers' load_lora_weights reads it."""

from __future__ import annotations

from pathlib import Path


def build_tiny_lora(folder: Path, variant: str = "edit", seed: int = 1) -> Path:
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from weights.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(variant)
    torch.manual_seed(seed)
    # init_lora_weights=False: random A and B, so the adapter really changes the output.
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.transformer.add_adapter(config)
    with torch.no_grad():  # make the change large enough to survive 8-bit output images
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.mul_(50.0)
    layers = get_peft_model_state_dict(pipe.transformer)
    folder.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(folder, transformer_lora_layers=layers, weight_name="tiny_lora.safetensors")
    return folder / "tiny_lora.safetensors"
