"""`metalora personalize` and `metalora export` on a local diffusers FLUX folder (the tiny one, saved)."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from metalora_core.cli import main
from metalora_core.formats.lora import load_lora
from metalora_core.lora.families import FLUX1
from metalora_core.lora.layers import FluxDims
from metalora_core.formats.prior import make_prior, save_prior
from sample_photos import sample_photo
from metalora_core.hosts.tiny import build_tiny_flux_pipeline


def test_personalize_then_export_from_state(tmp_path):
    pipe = build_tiny_flux_pipeline(seed=0)
    model_dir = tmp_path / "flux"
    pipe.save_pretrained(str(model_dir))
    dims = FluxDims.from_diffusers_config(pipe.transformer.config)
    prior = save_prior(make_prior(dims, r1=4, preset="attn", generator=torch.Generator().manual_seed(0)),
                       tmp_path / "prior.safetensors")
    lora, state = tmp_path / "out" / "lora.safetensors", tmp_path / "out" / "state.safetensors"
    args = ["personalize", "--model", str(model_dir), "--prior", str(prior), "--image", str(sample_photo("obama")),
            "--out", str(lora), "--state", str(state), "--steps", "3", "--resolution", "128",
            "--dtype", "float32", "--device", "cpu", "--caption", "a photo of a man"]
    assert main(args) == 0
    tensors, meta = load_lora(lora)
    assert meta["steps"] == "3" and meta["caption"] == "a photo of a man" and meta["detector"] == "yunet"
    assert len(tensors) == 2 * 22  # attn preset on 2 double + 2 single blocks
    exported = tmp_path / "out" / "exported.safetensors"
    assert main(["export", str(state), "--out", str(exported)]) == 0
    again, meta2 = load_lora(exported)
    assert set(again) == set(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert meta2["prior_sha256"] == meta["prior_sha256"]
    for m in (meta, meta2):  # the host's family names the model, in the LoRA and in its export from the state
        assert (m["base_model"], m["modelspec.architecture"]) == (FLUX1.name, FLUX1.modelspec_architecture)
    # plain-LoRA baseline without augmentation
    plain = tmp_path / "out" / "plain.safetensors"
    assert main(["personalize", "--model", str(model_dir), "--image", str(sample_photo("obama")), "--out", str(plain),
                 "--steps", "2", "--resolution", "128", "--dtype", "float32", "--device", "cpu",
                 "--no-augment", "--preset", "attn", "--class-noun", "man"]) == 0
    t3, m3 = load_lora(plain)
    assert m3["mode"] == "lora" and m3["detector"] == "yunet" and len(t3) == 2 * 22
    assert m3["caption"] == "a photo of a man"  # from --class-noun
    # a single-file transformer overrides the folder's (its config still comes from the folder)
    from safetensors.torch import save_file

    single = tmp_path / "transformer.safetensors"
    with torch.no_grad():
        changed = {k: v + 0.01 if k.endswith("proj_out.weight") else v for k, v in pipe.transformer.state_dict().items()}
    save_file(changed, str(single))
    lora2 = tmp_path / "out" / "single.safetensors"
    assert main(["personalize", "--model", str(model_dir), "--transformer", str(single), "--prior", str(prior),
                 "--image", str(sample_photo("obama")), "--out", str(lora2), "--steps", "3", "--resolution", "128",
                 "--dtype", "float32", "--device", "cpu", "--caption", "a photo of a man"]) == 0
    t4, _ = load_lora(lora2)
    assert set(t4) == set(tensors) and any(not torch.equal(t4[k], tensors[k]) for k in tensors)


def test_personalize_reports_missing_model_folder(tmp_path, capsys):
    assert main(["personalize", "--model", str(tmp_path), "--image", "x.jpg", "--out", str(tmp_path / "l.safetensors"),
                 "--device", "cpu", "--class-noun", "person"]) == 2
    assert "no model_index.json" in capsys.readouterr().err


def test_personalize_requires_the_class_noun_or_a_caption(tmp_path, capsys):
    """No caption is assumed for the subject (the paper states none): the command says what to pass."""
    from metalora_core.cli.commands import training_caption

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model_index.json").write_text("{}", encoding="utf-8")
    assert main(["personalize", "--model", str(model_dir), "--image", "x.jpg", "--out", str(tmp_path / "l.safetensors"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--class-noun" in err and "--caption" in err
    assert training_caption(None, "woman") == "a photo of a woman"
    assert training_caption("a photo of a dog", "woman") == "a photo of a dog"  # --caption wins
    with pytest.raises(ValueError, match="--class-noun"):
        training_caption("  ", None)


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flux")
    build_tiny_flux_pipeline(seed=0).save_pretrained(str(folder))
    return folder


def test_pipeline_loads_in_the_asked_dtype_without_a_deprecation(tiny_flux_dir):
    from metalora_core.hosts.diffusers_flux import load_flux_pipeline

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pipe = load_flux_pipeline(tiny_flux_dir, dtype="bfloat16", device="cpu")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert not [str(w.message) for w in seen if "dtype" in str(w.message)]


def test_a_cli_run_prints_no_warning(tiny_flux_dir, tmp_path):
    """A run that loads diffusers' FLUX pipeline (and with it transformers' CLIP) says nothing on
    stderr about torchvision or deprecations, and no traceback."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    lora = tmp_path / "lora.safetensors"
    run = subprocess.run([sys.executable, "-m", "metalora_core", "personalize", "--model", str(tiny_flux_dir),
                          "--image", str(sample_photo("obama")), "--out", str(lora), "--steps", "1",
                          "--resolution", "128", "--dtype", "float32", "--device", "cpu", "--no-augment",
                          "--preset", "attn", "--class-noun", "man"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0 and lora.is_file(), run.stderr[-3000:]
    noisy = [line for line in run.stderr.splitlines()
             if any(word in line.lower() for word in ("torchvision", "deprecat", "warning", "traceback"))]
    assert not noisy, noisy
