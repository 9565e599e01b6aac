"""Helpers for the ComfyUI-tier tests: a real ComfyUI checkout, run in-process.

ComfyUI is not on the package registries; tests find a git checkout through the environment
variable ``COMFYUI_PATH`` (the folder holding ComfyUI's ``main.py``) and skip when it is unset,
except in CI and under ``make test-comfyui``, where a missing checkout is an error.

* :func:`comfyui_path` - the checkout, or ``None`` (an error where :func:`comfyui_required`).
* :func:`write_tiny_flux_models` - small random-weight model files in ComfyUI's key layout
  (FLUX diffusion model, FLUX-layout VAE, CLIP-L text encoder). Pure torch + safetensors,
  deterministic for a given seed; does not need ComfyUI.
* :func:`load_comfy_in_process` - imports ComfyUI (CPU), points its folders at a base directory,
  loads the built-in nodes (and optionally custom node packs, through ComfyUI's own
  ``nodes.load_custom_node``) and returns a :class:`ComfyInProcess` handle.
* :func:`run_prompt` - validates and executes an API-format graph with ComfyUI's
  ``execution.validate_prompt`` + ``execution.PromptExecutor``; returns the history entry.

Only the web server is stood in for (:class:`RecordingServer`, which records what ComfyUI
would send over the websocket); everything else is ComfyUI itself. ComfyUI keeps global state
(``sys.modules``, node registry, ``folder_paths``), so it is imported once per process; later
calls to :func:`load_comfy_in_process` re-point the folders at the new base directory.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import sys
import types
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

COMFYUI_ENV = "COMFYUI_PATH"

TINY_FLUX_FILE = "tiny_flux.safetensors"
TINY_VAE_FILE = "tiny_flux_vae.safetensors"
TINY_CLIP_FILE = "tiny_clip_l.safetensors"


# --------------------------------------------------------------------------------------------
# Locating ComfyUI
# --------------------------------------------------------------------------------------------

def comfyui_required() -> bool:
    """True in CI (``CI=true``) and under ``make test-comfyui``: a missing ComfyUI is an error there."""
    flags = (os.environ.get("CI", ""), os.environ.get("METALORA_REQUIRE_COMFYUI", ""))
    return any(f.strip().lower() in ("1", "true", "yes") for f in flags)


def comfyui_path() -> pathlib.Path | None:
    """The ComfyUI checkout named by ``$COMFYUI_PATH``, or None if unset / not a checkout.

    Raises:
        RuntimeError: no checkout while :func:`comfyui_required` (the tier must run, not skip).
    """
    value = os.environ.get(COMFYUI_ENV, "").strip()
    path = pathlib.Path(value).expanduser().resolve() if value else None
    if path is not None and (path / "comfy").is_dir():
        return path
    if comfyui_required():
        raise RuntimeError(
            f"the ComfyUI tier must run here (CI or METALORA_REQUIRE_COMFYUI) but {COMFYUI_ENV}="
            f"{value!r} is not a ComfyUI checkout (no comfy/ folder); set it, e.g. with "
            '\'eval "$(../shared/comfyui/setup.sh)"\''
        )
    return None


SKIP_REASON = (
    f"ComfyUI-tier test: set {COMFYUI_ENV} to a ComfyUI checkout (the folder with main.py and "
    "comfy/) whose Python environment runs these tests"
)


# --------------------------------------------------------------------------------------------
# Tiny random-weight model files in ComfyUI key layout
# --------------------------------------------------------------------------------------------

def _randn(gen: torch.Generator, shape, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32) * std


def _linear(sd: dict, gen: torch.Generator, name: str, out_f: int, in_f: int, bias: bool = True,
            std: float | None = None) -> None:
    sd[f"{name}.weight"] = _randn(gen, (out_f, in_f), std if std is not None else in_f ** -0.5)
    if bias:
        sd[f"{name}.bias"] = _randn(gen, (out_f,), 0.02)


def tiny_flux_state_dict(seed: int = 0, *, hidden_size: int = 256, depth: int = 2,
                         depth_single_blocks: int = 2, context_in_dim: int = 768,
                         vec_in_dim: int = 768, guidance_embed: bool = True,
                         mlp_ratio: float = 4.0) -> dict[str, torch.Tensor]:
    """FLUX.1 (BFL / ComfyUI ``diffusion_model`` layout, no prefix) with random weights.

    ComfyUI (comfy/model_detection.py) infers: hidden_size from ``img_in.weight``, heads =
    hidden_size // 128 (axes_dim 16+56+56 fixed), depth / depth_single_blocks by counting
    ``double_blocks.N.`` / ``single_blocks.N.``, context_in_dim from ``txt_in.weight``,
    vec_in_dim from ``vector_in.in_layer.weight`` and guidance_embed from the presence of
    ``guidance_in.in_layer.weight``. in_channels 16 * patch 2x2 = 64 input features.
    """
    if hidden_size % 128:
        raise ValueError("FLUX head dim is fixed at 128: hidden_size must be a multiple of 128")
    gen = torch.Generator().manual_seed(seed)
    h, m, head_dim = hidden_size, int(hidden_size * mlp_ratio), 128
    patch_in = 16 * 2 * 2
    sd: dict[str, torch.Tensor] = {}
    _linear(sd, gen, "img_in", h, patch_in)
    _linear(sd, gen, "time_in.in_layer", h, 256)
    _linear(sd, gen, "time_in.out_layer", h, h)
    if vec_in_dim:
        _linear(sd, gen, "vector_in.in_layer", h, vec_in_dim)
        _linear(sd, gen, "vector_in.out_layer", h, h)
    if guidance_embed:
        _linear(sd, gen, "guidance_in.in_layer", h, 256)
        _linear(sd, gen, "guidance_in.out_layer", h, h)
    _linear(sd, gen, "txt_in", h, context_in_dim)
    mod_std = 0.2 * h ** -0.5  # keep the adaLN shifts/scales/gates small
    for i in range(depth):
        p = f"double_blocks.{i}"
        for s in ("img", "txt"):
            _linear(sd, gen, f"{p}.{s}_mod.lin", 6 * h, h, std=mod_std)
            _linear(sd, gen, f"{p}.{s}_attn.qkv", 3 * h, h)
            sd[f"{p}.{s}_attn.norm.query_norm.scale"] = torch.ones(head_dim)
            sd[f"{p}.{s}_attn.norm.key_norm.scale"] = torch.ones(head_dim)
            _linear(sd, gen, f"{p}.{s}_attn.proj", h, h)
            _linear(sd, gen, f"{p}.{s}_mlp.0", m, h)
            _linear(sd, gen, f"{p}.{s}_mlp.2", h, m)
    for i in range(depth_single_blocks):
        p = f"single_blocks.{i}"
        _linear(sd, gen, f"{p}.linear1", 3 * h + m, h)
        _linear(sd, gen, f"{p}.linear2", h, h + m)
        sd[f"{p}.norm.query_norm.scale"] = torch.ones(head_dim)
        sd[f"{p}.norm.key_norm.scale"] = torch.ones(head_dim)
        _linear(sd, gen, f"{p}.modulation.lin", 3 * h, h, std=mod_std)
    _linear(sd, gen, "final_layer.linear", patch_in, h)
    _linear(sd, gen, "final_layer.adaLN_modulation.1", 2 * h, h, std=mod_std)
    return sd


def _conv(sd: dict, gen: torch.Generator, name: str, out_c: int, in_c: int, k: int) -> None:
    sd[f"{name}.weight"] = _randn(gen, (out_c, in_c, k, k), (in_c * k * k) ** -0.5)
    sd[f"{name}.bias"] = _randn(gen, (out_c,), 0.02)


def _norm(sd: dict, name: str, c: int) -> None:
    sd[f"{name}.weight"] = torch.ones(c)
    sd[f"{name}.bias"] = torch.zeros(c)


def _resblock(sd, gen, name, in_c, out_c):
    _norm(sd, f"{name}.norm1", in_c)
    _conv(sd, gen, f"{name}.conv1", out_c, in_c, 3)
    _norm(sd, f"{name}.norm2", out_c)
    _conv(sd, gen, f"{name}.conv2", out_c, out_c, 3)
    if in_c != out_c:
        _conv(sd, gen, f"{name}.nin_shortcut", out_c, in_c, 1)


def _attnblock(sd, gen, name, c):
    _norm(sd, f"{name}.norm", c)
    for n in ("q", "k", "v", "proj_out"):
        _conv(sd, gen, f"{name}.{n}", c, c, 1)


def tiny_flux_vae_state_dict(seed: int = 0, *, decoder_ch: int = 32, encoder: bool = True,
                             z_channels: int = 16) -> dict[str, torch.Tensor]:
    """FLUX-layout VAE (LDM ``encoder.*`` / ``decoder.*`` keys, no quant convs) with random weights.

    comfy/sd.py ``VAE.__init__`` builds it from ``decoder.conv_in.weight``: z_channels from its
    input channels, and the *decoder* width as ``conv_in.out_channels // ch_mult[-1]`` (so a
    small decoder is allowed); the *encoder* always uses the default ch 128, ch_mult 1,2,4,4,
    num_res_blocks 2 (about 34M parameters). ``encoder=False`` leaves the encoder out (ComfyUI
    then warns about missing keys and VAEEncode gives garbage; VAEDecode still works).
    Channel widths must stay multiples of 32 (GroupNorm(32)).
    """
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    ch_mult = (1, 2, 4, 4)
    num_res = 2
    if encoder:
        ch = 128
        _conv(sd, gen, "encoder.conv_in", ch, 3, 3)
        in_c = ch
        for i, mult in enumerate(ch_mult):
            out_c = ch * mult
            for j in range(num_res):
                _resblock(sd, gen, f"encoder.down.{i}.block.{j}", in_c, out_c)
                in_c = out_c
            if i != len(ch_mult) - 1:
                _conv(sd, gen, f"encoder.down.{i}.downsample.conv", in_c, in_c, 3)
        _resblock(sd, gen, "encoder.mid.block_1", in_c, in_c)
        _attnblock(sd, gen, "encoder.mid.attn_1", in_c)
        _resblock(sd, gen, "encoder.mid.block_2", in_c, in_c)
        _norm(sd, "encoder.norm_out", in_c)
        _conv(sd, gen, "encoder.conv_out", 2 * z_channels, in_c, 3)
    ch = decoder_ch
    block_in = ch * ch_mult[-1]
    _conv(sd, gen, "decoder.conv_in", block_in, z_channels, 3)
    _resblock(sd, gen, "decoder.mid.block_1", block_in, block_in)
    _attnblock(sd, gen, "decoder.mid.attn_1", block_in)
    _resblock(sd, gen, "decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(len(ch_mult))):
        out_c = ch * ch_mult[i]
        for j in range(num_res + 1):
            _resblock(sd, gen, f"decoder.up.{i}.block.{j}", block_in, out_c)
            block_in = out_c
        if i != 0:
            _conv(sd, gen, f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    _norm(sd, "decoder.norm_out", block_in)
    _conv(sd, gen, "decoder.conv_out", 3, block_in, 3)
    return sd


def tiny_flux2_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """FLUX.2-layout VAE: the FLUX-layout VAE at 32 latent channels plus quant convs and the latent
    batch norm over 2 x 2 patches (``bn.running_*``), from which comfy/sd.py ``VAE.__init__`` builds
    FLUX.2's VAE (128 channels at 1/16 of the image side)."""
    gen = torch.Generator().manual_seed(seed + 100)
    sd = tiny_flux_vae_state_dict(seed, z_channels=32)
    _conv(sd, gen, "quant_conv", 64, 64, 1)
    _conv(sd, gen, "post_quant_conv", 32, 32, 1)
    sd["bn.running_mean"] = _randn(gen, (128,), 0.1)
    sd["bn.running_var"] = 1.0 + _randn(gen, (128,), 0.1).abs()
    return sd


# ComfyUI's own configs (comfy/model_detection.py) of FLUX.2 and Z-Image at tiny widths. FLUX.2 is
# detected from its weights at any width (heads of 128, ``axes_dim`` fixed), so its tiny config is
# the one detection gives; Z-Image is detected at its real width only (dim 3840), so the tiny
# model is built from ComfyUI's ``supported_models.ZImage`` with this config.
TINY_FLUX2_CONFIG = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=48,
                         hidden_size=128, mlp_ratio=3.0, num_heads=1, depth=1, depth_single_blocks=2,
                         axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=True,
                         global_modulation=True, mlp_silu_act=True, ops_bias=False, txt_ids_dims=[3])
TINY_ZIMAGE_CONFIG = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=256, n_layers=2, n_refiner_layers=1,
                          n_heads=4, n_kv_heads=4, multiple_of=16, ffn_dim_multiplier=8.0 / 3.0, qk_norm=True,
                          cap_feat_dim=40, axes_dims=[16, 24, 24], axes_lens=[64, 32, 32], rope_theta=256.0,
                          z_image_modulation=True, time_scale=1000.0)
ZIMAGE_FULL_CONFIG = dict(TINY_ZIMAGE_CONFIG, dim=3840, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48],
                          axes_lens=[1536, 512, 512], cap_feat_dim=2560, n_layers=30, n_refiner_layers=2)


def comfy_module_state_dict(kind: str, config: dict, seed: int = 0, *, meta: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of ComfyUI's own diffusion module (``kind``: "flux" or "lumina") built with
    ``config``: its key names and shapes, with random weights (norm scales 1); on the meta device
    (shapes only) with ``meta``. Needs ComfyUI imported."""
    import comfy.ops

    if kind == "flux":
        from comfy.ldm.flux.model import Flux as cls
    else:
        from comfy.ldm.lumina.model import NextDiT as cls
    kwargs = {k: v for k, v in config.items() if k != "image_model" or kind == "flux"}
    with torch.device("meta"):
        module = cls(**kwargs, operations=comfy.ops.disable_weight_init)
    shapes = module.state_dict()
    if meta:
        return dict(shapes)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k in sorted(shapes):
        shape = tuple(shapes[k].shape)
        if len(shape) >= 2:
            out[k] = _randn(gen, shape, (shape[1] * max(1, int(torch.tensor(shape[2:]).prod()))) ** -0.5)
        elif "norm" in k or k.endswith(".scale"):
            out[k] = 1.0 + _randn(gen, shape, 0.02)
        else:
            out[k] = _randn(gen, shape, 0.02)
    return out


def tiny_zimage_model(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, *,
                      config: dict | None = None, kind: str = "ZImage"):
    """A ComfyUI MODEL of the tiny Z-Image: ComfyUI's ``supported_models.ZImage`` (or ``kind``) with
    ``TINY_ZIMAGE_CONFIG`` (or ``config``) and ``sd``, built as
    ``comfy.sd.load_diffusion_model_state_dict`` builds a detected model."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, kind)(dict(config or TINY_ZIMAGE_CONFIG))
    config.set_inference_dtype(dtype, None)
    model = config.get_model(sd, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    model.load_model_weights(sd, "")
    return patcher


@contextlib.contextmanager
def tiny_zimage_detection(config: dict | None = None) -> Iterator[None]:
    """ComfyUI's model detection with one more row while the block runs: a Lumina 2 key set at the
    tiny Z-Image's width (``config``, default ``TINY_ZIMAGE_CONFIG``) is ``supported_models.ZImage``
    with that config, as ComfyUI detects the real key set at width 3840. Width, text width and depth
    still come from ComfyUI's own ``detect_unet_config``, so a tiny Z-Image file loads through
    *Load Diffusion Model* as the real one does. Needs ComfyUI imported."""
    import comfy.model_detection
    import comfy.supported_models

    config = dict(config or TINY_ZIMAGE_CONFIG)
    real = comfy.model_detection.model_config_from_unet_config

    def with_tiny_zimage(unet_config, state_dict=None, unet_key_prefix=""):
        if unet_config.get("image_model") == "lumina2" and unet_config.get("dim") == config["dim"]:
            return comfy.supported_models.ZImage({**config, **unet_config})
        return real(unet_config, state_dict, unet_key_prefix)

    comfy.model_detection.model_config_from_unet_config = with_tiny_zimage
    try:
        yield
    finally:
        comfy.model_detection.model_config_from_unet_config = real


# CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14), as in ComfyUI's comfy/sd1_clip_config.json.
CLIP_L_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                     projection_dim=768)


def tiny_clip_l_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` keys (``text_model.*``) for the CLIP-L config, random weights.

    ComfyUI's CLIPLoader (type ``stable_diffusion``) detects CLIP-L by
    ``text_model.encoder.layers.0.mlp.fc1.weight`` and then builds the model from its fixed
    sd1_clip_config.json (768 wide, 12 layers, 77 tokens, vocab 49408), so the shapes cannot be
    made smaller. About 123M parameters. ``text_projection.weight`` (768x768) is included so
    ComfyUI's projected pooled output is defined.
    """
    c = CLIP_L_CONFIG
    gen = torch.Generator().manual_seed(seed)
    h, f = c["hidden_size"], c["intermediate_size"]
    sd: dict[str, torch.Tensor] = {}
    sd["text_model.embeddings.token_embedding.weight"] = _randn(gen, (c["vocab_size"], h), 0.02)
    sd["text_model.embeddings.position_embedding.weight"] = _randn(gen, (c["max_position_embeddings"], h), 0.01)
    for i in range(c["num_hidden_layers"]):
        p = f"text_model.encoder.layers.{i}"
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            _linear(sd, gen, f"{p}.self_attn.{n}", h, h, std=0.02)
        _norm(sd, f"{p}.layer_norm1", h)
        _linear(sd, gen, f"{p}.mlp.fc1", f, h, std=0.02)
        _linear(sd, gen, f"{p}.mlp.fc2", h, f, std=0.02)
        _norm(sd, f"{p}.layer_norm2", h)
    _norm(sd, "text_model.final_layer_norm", h)
    sd["text_projection.weight"] = _randn(gen, (c["projection_dim"], h), h ** -0.5)
    return sd


def write_tiny_flux_models(models_dir: pathlib.Path | str, seed: int = 0, *,
                           clip_dtype: torch.dtype = torch.float16,
                           vae_dtype: torch.dtype = torch.float16,
                           flux_dtype: torch.dtype = torch.float32,
                           **flux_kwargs) -> dict[str, str]:
    """Write tiny random-weight FLUX / VAE / CLIP-L files under a ComfyUI ``models/`` folder.

    Files: ``diffusion_models/tiny_flux.safetensors`` (UNETLoader), ``vae/tiny_flux_vae.safetensors``
    (VAELoader), ``clip/tiny_clip_l.safetensors`` (CLIPLoader, type ``stable_diffusion``).
    Returns the file names as the loader nodes expect them (relative to their model folder)
    under the keys ``unet``, ``vae`` and ``clip``. The large CLIP-L and VAE encoder are stored
    in float16 by default (about 250 MB + 70 MB); ComfyUI upcasts on CPU.
    """
    from safetensors.torch import save_file

    models_dir = pathlib.Path(models_dir)
    files = {
        "unet": ("diffusion_models", TINY_FLUX_FILE,
                 lambda: tiny_flux_state_dict(seed, **flux_kwargs), flux_dtype),
        "vae": ("vae", TINY_VAE_FILE, lambda: tiny_flux_vae_state_dict(seed + 1), vae_dtype),
        "clip": ("clip", TINY_CLIP_FILE, lambda: tiny_clip_l_state_dict(seed + 2), clip_dtype),
    }
    out: dict[str, str] = {}
    for key, (folder, name, make, dtype) in files.items():
        target = models_dir / folder
        target.mkdir(parents=True, exist_ok=True)
        sd = {k: v.to(dtype).contiguous() for k, v in make().items()}
        save_file(sd, str(target / name))
        out[key] = name
    return out


# --------------------------------------------------------------------------------------------
# ComfyUI in-process
# --------------------------------------------------------------------------------------------

class ComfyPromptError(RuntimeError):
    """A graph failed validation or execution; ``details`` holds ComfyUI's error data."""

    def __init__(self, message: str, details: Any):
        super().__init__(f"{message}: {details}")
        self.details = details


class RecordingServer:
    """Stands in for ComfyUI's web server (server.PromptServer) in-process.

    It has the attributes the executor and nodes use (client_id, last_node_id,
    last_prompt_id, sockets_metadata, send_sync, send_progress_text, routes,
    node_replace_manager) and records every message that would go to the websocket in
    ``messages`` as ``(event, data, sid)`` tuples. ``send_progress_text`` is recorded as
    ``("progress_text", {"node_id": ..., "text": ...}, sid)``.
    """

    def __init__(self):
        from aiohttp import web
        from app.node_replace_manager import NodeReplaceManager  # real ComfyUI class

        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets: dict = {}
        self.sockets_metadata: dict = {}
        self.supports = ["custom_nodes_from_web"]
        self.routes = web.RouteTableDef()
        self.node_replace_manager = NodeReplaceManager()
        self.messages: list[tuple[str, Any, str | None]] = []
        self.loop = None

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data, sid))

    async def send(self, event, data, sid=None):
        self.send_sync(event, data, sid)

    def send_progress_text(self, text, node_id, sid=None):
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8", "replace")
        self.send_sync("progress_text", {"node_id": str(node_id), "text": text}, sid)

    def queue_updated(self):
        pass

    def events(self, name: str) -> list:
        return [d for e, d, _ in self.messages if e == name]


@dataclass
class ComfyInProcess:
    root: pathlib.Path
    base_dir: pathlib.Path
    nodes: types.ModuleType
    execution: types.ModuleType
    folder_paths: types.ModuleType
    server: RecordingServer
    custom_nodes_loaded: dict[str, bool] = field(default_factory=dict)
    comfy_args: tuple[str, ...] = ()  # the extra command-line options ComfyUI was imported with

    def run_prompt(self, api_prompt: dict, **kw) -> dict:
        return run_prompt(api_prompt, comfy=self, **kw)


_STATE: ComfyInProcess | None = None


def _import_comfy(root: pathlib.Path, base_dir: pathlib.Path, comfy_args: Iterable[str] = ()) -> None:
    root_s = str(root)
    # ComfyUI's comfy/ has no __init__.py, so any regular ``comfy`` package on sys.path would win
    # over it wherever it stands (pytest puts the checkout's parent folder there, which may hold one).
    sys.path[:] = [p for p in sys.path
                   if p != root_s and not (pathlib.Path(p or ".") / "comfy" / "__init__.py").is_file()]
    sys.path.insert(0, root_s)
    # The project has its own ``nodes/`` folder; make sure ``nodes`` is ComfyUI's nodes.py.
    for name in ("nodes", "execution", "server", "folder_paths", "utils", "app", "comfy"):
        mod = sys.modules.get(name)
        mod_file = getattr(mod, "__file__", None) or ""
        paths = list(getattr(mod, "__path__", []) or [])
        if mod is not None and not any(str(p).startswith(root_s) for p in [mod_file, *paths]):
            del sys.modules[name]
    if "comfy.cli_args" not in sys.modules:
        import comfy.options
        comfy.options.enable_args_parsing()
        saved_argv = sys.argv
        sys.argv = [str(root / "main.py"), "--cpu", "--disable-api-nodes",
                    "--base-directory", str(base_dir), *comfy_args]
        try:
            import comfy.cli_args  # noqa: F401  (parses sys.argv once, at import)
        finally:
            sys.argv = saved_argv


def _point_folders(folder_paths, base_dir: pathlib.Path) -> None:
    """Re-point every default folder of folder_paths from its current base at ``base_dir``."""
    old_base = os.path.abspath(folder_paths.base_path)
    old_models = os.path.abspath(folder_paths.models_dir)
    new_base = str(base_dir.resolve())
    new_models = os.path.join(new_base, "models")

    def move(p: str) -> str:
        ap = os.path.abspath(p)
        for old, new in ((old_models, new_models), (old_base, new_base)):
            if ap == old or ap.startswith(old + os.sep):
                return new + ap[len(old):]
        return p

    for name, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        folder_paths.folder_names_and_paths[name] = ([move(p) for p in paths], exts)
    folder_paths.base_path = new_base
    folder_paths.models_dir = new_models
    for sub, setter in (("output", folder_paths.set_output_directory),
                        ("input", folder_paths.set_input_directory),
                        ("temp", folder_paths.set_temp_directory),
                        ("user", folder_paths.set_user_directory)):
        os.makedirs(os.path.join(new_base, sub), exist_ok=True)
        setter(os.path.join(new_base, sub))
    for sub in ("diffusion_models", "vae", "clip", "loras", "checkpoints"):
        os.makedirs(os.path.join(new_models, sub), exist_ok=True)
    folder_paths.filename_list_cache.clear()


def _install_progress_hook(server: RecordingServer) -> None:
    """What main.py's hijack_progress does, minus the websocket: interrupt check + messages."""
    import comfy.model_management
    import comfy.utils
    from comfy_execution.progress import get_progress_state
    from comfy_execution.utils import get_executing_context

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        comfy.model_management.throw_exception_if_processing_interrupted()
        if prompt_id is None:
            prompt_id = server.last_prompt_id
        if node_id is None:
            node_id = server.last_node_id
        get_progress_state().update_progress(node_id, value, total, preview_image)
        server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id,
                                      "node": node_id}, server.client_id)
        if preview_image is not None:
            server.send_sync("preview_image", preview_image, server.client_id)

    comfy.utils.set_progress_bar_global_hook(hook)


def load_comfy_in_process(base_dir: pathlib.Path | str, *,
                          custom_node_paths: Iterable[pathlib.Path | str] = (),
                          root: pathlib.Path | str | None = None,
                          comfy_args: Iterable[str] = ()) -> ComfyInProcess:
    """Import ComfyUI (CPU), point it at ``base_dir`` and load its nodes in this process.

    ``base_dir`` gets ``models/`` (diffusion_models, vae, clip, loras, ...), ``input/``,
    ``output/``, ``temp/`` and ``user/``. The first call imports ComfyUI with
    ``--cpu --disable-api-nodes --base-directory base_dir`` and runs
    ``nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)``; each path in
    ``custom_node_paths`` (a pack folder with ``__init__.py``, or a .py file) is then loaded with
    ComfyUI's own ``nodes.load_custom_node`` exactly as from ``custom_nodes/`` (a V1 pack's
    NODE_CLASS_MAPPINGS or a V3 pack's ``comfy_entrypoint()``). ``comfy_args``: more of ComfyUI's
    command-line options (e.g. ``--use-pytorch-cross-attention``), read at the first import only.
    Later calls reuse the import, re-point the folders and load packs not loaded yet.
    """
    global _STATE
    root = pathlib.Path(root).resolve() if root is not None else comfyui_path()
    if root is None:
        raise RuntimeError(SKIP_REASON)
    base_dir = pathlib.Path(base_dir).resolve()
    base_dir.mkdir(parents=True, exist_ok=True)

    if _STATE is None:
        _import_comfy(root, base_dir, comfy_args)
        import comfy.model_management  # noqa: F401
        import execution
        import folder_paths
        import nodes
        import server as comfy_server

        srv = RecordingServer()
        comfy_server.PromptServer.instance = srv  # what nodes reach as PromptServer.instance
        _point_folders(folder_paths, base_dir)
        failed = asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        if failed:
            logging.warning("ComfyUI extra nodes that failed to import: %s", failed)
        _install_progress_hook(srv)
        _STATE = ComfyInProcess(root=root, base_dir=base_dir, nodes=nodes, execution=execution,
                                folder_paths=folder_paths, server=srv, comfy_args=tuple(comfy_args))
    elif tuple(comfy_args) and tuple(comfy_args) != _STATE.comfy_args:
        raise RuntimeError(f"ComfyUI was imported in this process with options {list(_STATE.comfy_args)}; "
                           f"{list(comfy_args)} need a process of their own")
    if _STATE.base_dir != base_dir:
        _point_folders(_STATE.folder_paths, base_dir)
        _STATE.base_dir = base_dir

    state = _STATE
    for p in custom_node_paths:
        p = str(pathlib.Path(p).resolve())
        if p in state.custom_nodes_loaded:
            continue
        base_names = set(state.nodes.NODE_CLASS_MAPPINGS.keys())
        ok = asyncio.run(state.nodes.load_custom_node(p, base_names, module_parent="custom_nodes"))
        state.custom_nodes_loaded[p] = ok
        if not ok:
            raise RuntimeError(f"ComfyUI could not load the custom node pack {p} (see the log)")
    return state


def run_prompt(api_prompt: dict, *, comfy: ComfyInProcess | None = None,
               client_id: str | None = "tests", raise_on_error: bool = True,
               extra_data: dict | None = None, executor: Any = None) -> dict:
    """Validate and execute an API-format graph in-process, as ComfyUI's /prompt + worker do.

    Returns ``{"prompt_id", "success", "outputs", "meta", "status_messages", "messages",
    "node_errors"}``: ``outputs`` is the history entry's per-node UI output (e.g.
    ``outputs[save_node]["images"] == [{"filename", "subfolder", "type"}]``),
    ``messages`` what the server would have sent for this prompt. Pass the same ``executor``
    (from :func:`new_executor`) to several calls to keep ComfyUI's output cache between them,
    as a running server does. Raises
    :class:`ComfyPromptError` on a validation or execution error unless ``raise_on_error``
    is False.
    """
    state = comfy or _STATE
    if state is None:
        raise RuntimeError("call load_comfy_in_process(base_dir) first")
    execution, srv = state.execution, state.server
    prompt = {k: dict(v) for k, v in api_prompt.items()}
    srv.node_replace_manager.apply_replacements(prompt)
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(
        execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        if raise_on_error:
            raise ComfyPromptError("prompt failed validation", {"error": error, "node_errors": node_errors})
        return {"prompt_id": prompt_id, "success": False, "outputs": {}, "meta": {},
                "status_messages": [], "messages": [], "node_errors": node_errors, "error": error}
    first = len(srv.messages)
    srv.last_prompt_id = prompt_id
    if executor is None:
        executor = new_executor(state)
    data = dict(extra_data or {})
    if client_id is not None:
        data.setdefault("client_id", client_id)
    executor.execute(prompt, prompt_id, data, outputs)
    history = getattr(executor, "history_result", {"outputs": {}, "meta": {}})
    result = {"prompt_id": prompt_id, "success": executor.success,
              "outputs": history.get("outputs", {}), "meta": history.get("meta", {}),
              "status_messages": list(executor.status_messages),
              "messages": srv.messages[first:], "node_errors": node_errors}
    if not executor.success and raise_on_error:
        errors = [d for e, d in executor.status_messages
                  if e in ("execution_error", "execution_interrupted")]
        raise ComfyPromptError("prompt failed during execution", errors)
    return result


def new_executor(comfy: ComfyInProcess | None = None):
    """A ``PromptExecutor`` like the server's (classic cache); reuse it to keep its output cache."""
    state = comfy or _STATE
    if state is None:
        raise RuntimeError("call load_comfy_in_process(base_dir) first")
    return state.execution.PromptExecutor(state.server, cache_type=state.execution.CacheType.CLASSIC,
                                          cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})


def output_files(result: dict, base_dir: pathlib.Path | str) -> list[pathlib.Path]:
    """Paths of the images/files that output nodes (SaveImage, ...) reported in ``result``."""
    base_dir = pathlib.Path(base_dir)
    files = []
    for node_out in result["outputs"].values():
        for items in node_out.values():
            if not isinstance(items, list):
                continue
            for it in items:
                if isinstance(it, dict) and "filename" in it:
                    files.append(base_dir / it.get("type", "output") / it.get("subfolder", "") / it["filename"])
    return files


# --------------------------------------------------------------------------------------------
# Added for the evaluation-node and workflow tests
# --------------------------------------------------------------------------------------------

def register_v3_nodes(comfy: ComfyInProcess, node_classes: Iterable[type]) -> list[str]:
    """Registers V3 node classes the way ``nodes.load_custom_node`` does for a pack's extension
    (for nodes a pack defines but its extension does not list yet); already known ids are kept.
    Returns the ids that were added."""
    added = []
    for cls in node_classes:
        schema = cls.GET_SCHEMA()
        if schema.node_id in comfy.nodes.NODE_CLASS_MAPPINGS:
            continue
        comfy.nodes.NODE_CLASS_MAPPINGS[schema.node_id] = cls
        if schema.display_name:
            comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name
        cls.RELATIVE_PYTHON_MODULE = "custom_nodes.ComfyUI-MetaLoRA"
        added.append(schema.node_id)
    return added


def object_info(comfy: ComfyInProcess, node_types: Iterable[str] | None = None) -> dict[str, dict]:
    """What ``GET /object_info`` answers for the given node types (default: all), built the way
    server.py's ``node_info`` does (V3 nodes: ``GET_NODE_INFO_V1()``; V1 nodes: INPUT_TYPES etc.)."""
    from comfy_api.internal import _ComfyNodeInternal

    names = list(comfy.nodes.NODE_CLASS_MAPPINGS) if node_types is None else list(node_types)
    out: dict[str, dict] = {}
    for name in names:
        cls = comfy.nodes.NODE_CLASS_MAPPINGS.get(name)
        if cls is None:
            continue
        if issubclass(cls, _ComfyNodeInternal):
            out[name] = cls.GET_NODE_INFO_V1()
            continue
        inputs = cls.INPUT_TYPES()
        out[name] = {
            "input": inputs,
            "input_order": {k: list(v.keys()) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "name": name,
            "display_name": comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
            "category": getattr(cls, "CATEGORY", "sd"),
            "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
        }
    return out


def random_meta_adapters(pack_module, dims, preset: str, seed: int = 0):
    """Meta-LoRA adapters on a random r1=4 prior with a non-zero Up (so Mid gets a gradient).

    ``pack_module(name)`` returns a module of the pack as ComfyUI imported it, so the adapters are
    of the classes the pack's nodes use.
    """
    layers, recipe, prior_mod = (pack_module(f"metalora_core.{m}") for m in ("lora.layers", "train.recipe", "formats.prior"))
    g = torch.Generator().manual_seed(seed)
    shapes = layers.resolve_targets(preset, dims)
    downs = {n: torch.randn(4, fin, generator=g) / fin ** 0.5 for n, (fin, _) in shapes.items()}
    ad = recipe.build_adapters(dims, prior_mod.Prior(downs=downs, r1=4, preset=preset,
                                                                  base_model=dims.family.name), rank=2, seed=seed)
    with torch.no_grad():
        for _, a in ad.items():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.05)
    return ad


def model_output(model, seed: int = 3) -> torch.Tensor:
    """A FLUX MODEL's ``apply_model`` output on a fixed random input (inference mode, as sampling runs)."""
    import comfy.model_management

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx, pooled = torch.randn(1, 77, 768, generator=g), torch.randn(1, 768, generator=g)
    comfy.model_management.load_models_gpu([model])
    with torch.inference_mode():
        return model.model.apply_model(x, torch.tensor([0.7]), c_crossattn=ctx, y=pooled,
                                       guidance=torch.tensor([1.0]),
                                       transformer_options=model.model_options.get("transformer_options", {})).clone()


def assert_untouched(model, before: torch.Tensor) -> None:
    """The caller's MODEL after training: same output, no patches, hooks or module forwards left."""
    import comfy.model_management

    assert torch.equal(model_output(model), before), "the caller's MODEL output changed"
    assert model.patches == {}, f"patches left on the caller's MODEL: {list(model.patches)[:3]}"
    assert not model.model_options.get("transformer_options", {}).get("patches_replace"), "block patches left"
    hooks = [n for n, m in model.model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not hooks, f"hooks left on {hooks[:3]}"
    forwards = [n for n, m in model.model.named_modules() if "forward" in m.__dict__]
    assert not forwards, f"a forward left on {forwards[:3]}"
    assert comfy.model_management.in_training is False


REPO = pathlib.Path(__file__).resolve().parents[1]  # the pack's root folder


def pack(module: str) -> types.ModuleType:
    """A module of the pack as ComfyUI imported it (package name = the pack's path)."""
    import importlib

    return importlib.import_module(f"{REPO}.{module}")


def pack_env(base: pathlib.Path, *, photo: pathlib.Path | None = None, seed: int = 0) -> ComfyInProcess:
    """Tiny FLUX model files in ``base/models``, ComfyUI loaded in process with the pack, and
    ``photo`` (if given) as ``input/obama.jpg``; ``state.names`` are the model file names."""
    import shutil

    names = write_tiny_flux_models(base / "models", seed=seed)
    state = load_comfy_in_process(base, custom_node_paths=[REPO])
    if photo is not None:
        shutil.copy(photo, base / "input" / "obama.jpg")
    state.names = names
    return state


def train_graph(env: Any, *, augment_seed: int = 0, train_seed: int = 0, steps: int = 2, rank: int = 1,
                force: bool = True, subfolder: str = "metalora", prefix: str = "person") -> dict:
    """The pack's chain in API format on ``pack_env``'s files: load -> augment -> train -> save the LoRA."""
    n = env.names
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": n["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": n["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": n["vae"]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a man", "clip": ["2", 0]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
        "6": {"class_type": "MetaLoRAFaceAugment",
              "inputs": {"image": ["5", 0], "detector": "yunet", "seed": augment_seed, "bucket_resolution": 64}},
        "7": {"class_type": "MetaLoRATrain",
              "inputs": {"model": ["1", 0], "vae": ["3", 0], "crops": ["6", 0], "positive": ["4", 0],
                         "steps": steps, "rank": rank, "learning_rate": 4e-4, "seed": train_seed, "resolution": 64,
                         "gradient_checkpointing": False, "preview_every": 0, "force_retrain": force}},
        "8": {"class_type": "MetaLoRASave",
              "inputs": {"meta_lora": ["7", 0], "subfolder": subfolder, "filename_prefix": prefix}},
    }
