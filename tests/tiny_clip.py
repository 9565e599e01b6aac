"""A tiny random-weight transformers CLIP saved to a folder: the CLIP-T model of the tests."""
from __future__ import annotations

from pathlib import Path

import torch


def write_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Saves a tiny random-weight transformers ``CLIPModel`` (32 wide, 32 px images) with a
    byte-level tokenizer and a ``CLIPImageProcessor`` to ``folder``: the CLIP-T model of tests."""
    from metalora_core.hosts.quiet import no_torchvision_notice
    from metalora_core.hosts.tiny import TINY_CLIP_LEN, byte_tokenizer

    with no_torchvision_notice():
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = byte_tokenizer("<|startoftext|>", "<|endoftext|>", "<|endoftext|>", TINY_CLIP_LEN)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=TINY_CLIP_LEN, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
