"""LoRA files used as priors: this pack's key tables against diffusers' own FLUX LoRA converter.

Files are built here at FLUX.1 widths (hidden 3072, one double and one single block: diffusers'
kohya converter hard-codes those widths) in three layouts: peft with diffusers names, kohya
(``lora_unet_*`` with ``alpha``) and peft with BFL/ComfyUI names (``diffusion_model.*``).
Only the Down (``lora_A`` / ``lora_down``) matrices matter for a prior. Where diffusers is exact
it must agree with the tables bit for bit; where it is not, the test pins down why the tables stay:
diffusers folds kohya's alpha/rank into Down and leaves BFL-named peft keys unconverted.
"""
from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file, save_file

from metalora_core.formats.prior import load_prior
from metalora_core.lora.families import FLUX1
from metalora_core.lora.layers import FluxDims, resolve_targets

DIMS = FluxDims(hidden=3072, mlp_hidden=12288, num_double=1, num_single=1)
RANK = 4


def _bfl_modules() -> dict[str, tuple[str, tuple[str, ...], int, int]]:
    """BFL module name -> (block prefix, canonical suffixes, in, fused out) at FLUX.1 widths."""
    known = resolve_targets("all", DIMS)
    out = {}
    for module, full in FLUX1.comfy_modules(DIMS).items():
        canon = full[0].split(".")[0]
        out[module] = (canon, full, known[full[0]][0], sum(known[n][1] for n in full))
    return out


def _pair(g: torch.Generator, fin: int, fout: int) -> tuple[torch.Tensor, torch.Tensor]:
    # A dense random Up: diffusers would chunk Down of a block-sparse fused Up (another layout).
    return torch.randn(RANK, fin, generator=g), torch.randn(fout, RANK, generator=g)


def _kohya_and_bfl(alpha: float) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)
    kohya, bfl = {}, {}
    for module, (_, _, fin, fout) in _bfl_modules().items():
        down, up = _pair(g, fin, fout)
        stem = "lora_unet_" + module.replace(".", "_")
        kohya.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                      f"{stem}.alpha": torch.tensor(alpha)})
        bfl.update({f"diffusion_model.{module}.lora_A.weight": down, f"diffusion_model.{module}.lora_B.weight": up})
    return kohya, bfl


def _peft() -> dict:
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, (fin, fout) in resolve_targets("all", DIMS).items():
        down, up = _pair(g, fin, fout)
        out.update({f"transformer.{name}.lora_A.weight": down, f"transformer.{name}.lora_B.weight": up})
    return out


def _diffusers_downs(tensors: dict) -> dict[str, torch.Tensor]:
    converted = FluxPipeline.lora_state_dict({k: v.clone() for k, v in tensors.items()})
    return {k[len("transformer."): -len(".lora_A.weight")]: v for k, v in converted.items()
            if k.startswith("transformer.") and k.endswith(".lora_A.weight")}


def _tables_downs(tensors: dict, tmp_path, name: str) -> dict[str, torch.Tensor]:
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    assert set(load_file(str(path))) == set(tensors)
    return load_prior(path).downs


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_peft_file_diffusers_and_tables_agree_exactly(tmp_path):
    tensors = _peft()
    ours = _tables_downs(tensors, tmp_path, "peft")
    assert list(ours) == list(resolve_targets("all", DIMS))  # every layer, in model order
    assert _same(ours, _diffusers_downs(tensors))


def test_kohya_file_without_alpha_scale_diffusers_and_tables_agree_exactly(tmp_path):
    kohya, _ = _kohya_and_bfl(alpha=float(RANK))  # alpha == rank: diffusers' scale is exactly 1
    ours = _tables_downs(kohya, tmp_path, "kohya")
    assert len(ours) == len(resolve_targets("all", DIMS))
    assert _same(ours, _diffusers_downs(kohya))
    for module, (_, names, _, _) in _bfl_modules().items():  # a fused qkv / linear1 shares one Down
        down = kohya["lora_unet_" + module.replace(".", "_") + ".lora_down.weight"]
        assert all(torch.equal(ours[n], down) for n in names), module


def test_kohya_alpha_is_folded_into_down_by_diffusers_not_by_the_tables(tmp_path):
    """Why the tables stay: a prior is the file's Down; diffusers returns Down * alpha/rank."""
    kohya, _ = _kohya_and_bfl(alpha=1.0)
    ours = _tables_downs(kohya, tmp_path, "kohya_alpha")
    theirs = _diffusers_downs(kohya)
    assert set(ours) == set(theirs)
    # alpha / rank = 1/4, which diffusers splits as 1/2 on Down and 1/2 on Up.
    for name in ours:
        assert torch.equal(theirs[name], ours[name] * 0.5), name


def test_bfl_named_peft_file_is_read_by_the_tables_not_by_diffusers(tmp_path):
    kohya, bfl = _kohya_and_bfl(alpha=float(RANK))
    ours = _tables_downs(bfl, tmp_path, "bfl")
    assert _same(ours, _tables_downs(kohya, tmp_path, "kohya_same"))  # same matrices, other names
    assert _diffusers_downs(bfl) == {}  # diffusers leaves diffusion_model.* keys as they are
    assert load_prior(tmp_path / "bfl.safetensors").source == "peft"


@pytest.mark.parametrize("alpha", [float(RANK), 1.0])
def test_prior_from_kohya_is_independent_of_alpha(tmp_path, alpha):
    kohya, _ = _kohya_and_bfl(alpha=alpha)
    base, _ = _kohya_and_bfl(alpha=float(RANK))
    assert _same(_tables_downs(kohya, tmp_path, f"k{alpha}"), _tables_downs(base, tmp_path, "k_base"))
