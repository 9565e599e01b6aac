"""Tiny FLUX.2 (Klein) and Z-Image pipelines built locally (no download): the tests' models of those families.

Real diffusers classes (``Flux2KleinPipeline`` with ``Flux2Transformer2DModel`` and
``AutoencoderKLFlux2``; ``ZImagePipeline`` with ``ZImageTransformer2DModel`` and ``AutoencoderKL``)
and real transformers Qwen3 text encoders, all with tiny configs and random weights, plus a
byte-level tokenizer with a chat template built in code (``tiny.byte_tokenizer``). Like the tiny
FLUX.1 they prove the pipeline end to end and say nothing about image quality.
"""
from __future__ import annotations

import torch

from .tiny import byte_tokenizer

TINY_QWEN_LEN = 512  # the pipelines' default max_sequence_length
# the Qwen chat layout both pipelines format a caption with (a user turn, then the assistant's turn)
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
KLEIN_TEXT_LAYERS = 28  # Flux2KleinPipeline stacks the text encoder's hidden states 9, 18 and 27


def qwen_tokenizer():
    """A byte-level tokenizer with the Qwen chat template; every string tokenizes, nothing is downloaded."""
    tok = byte_tokenizer(None, "<|im_end|>", "<|endoftext|>", TINY_QWEN_LEN)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _qwen3(tok, *, hidden: int, layers: int, causal_lm: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3Model

    config = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2,
                         max_position_embeddings=TINY_QWEN_LEN, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return (Qwen3ForCausalLM if causal_lm else Qwen3Model)(config)


def _frozen(*modules: torch.nn.Module) -> None:
    for m in modules:
        m.eval().requires_grad_(False)


def build_tiny_flux2_pipeline(seed: int = 0, *, text_dim: int = 16):
    """A ``Flux2KleinPipeline`` (FLUX.2 Klein layout: Qwen3 text encoder, no guidance input) with tiny
    random-weight components, deterministic in ``seed``. The VAE's latent batch-norm statistics
    are drawn too, so the latent normalisation is not the identity."""
    from .quiet import no_torchvision_notice

    with no_torchvision_notice():
        from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                               Flux2Transformer2DModel)

    tok = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = _qwen3(tok, hidden=text_dim, layers=KLEIN_TEXT_LAYERS, causal_lm=True)
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * text_dim, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
        vae = AutoencoderKLFlux2(
            block_out_channels=(16, 16, 32, 32), layers_per_block=1, latent_channels=32, norm_num_groups=8,
            sample_size=256, mid_block_add_attention=False)
        with torch.no_grad():
            vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape))
            vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok, transformer=transformer,
                              is_distilled=True)
    _frozen(text, transformer, vae)
    return pipe


def build_tiny_zimage_pipeline(seed: int = 0, *, text_dim: int = 16):
    """A ``ZImagePipeline`` (Qwen3 text encoder, the FLUX.1 VAE layout) with tiny random-weight
    components, deterministic in ``seed``."""
    from .quiet import no_torchvision_notice

    with no_torchvision_notice():
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    tok = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = _qwen3(tok, hidden=text_dim, layers=2, causal_lm=False)
        transformer = ZImageTransformer2DModel(
            in_channels=16, dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=4, cap_feat_dim=text_dim,
            axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64])
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32),
            layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=256,
            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
        with torch.no_grad():  # diffusers zero-initialises the pad tokens; give them values as trained ones have
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok, transformer=transformer)
    _frozen(text, transformer, vae)
    return pipe
