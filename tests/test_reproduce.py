"""The small-scale reproduction (experiments/reproduce.py) and the small domain it runs on."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metalora_core.synthfaces import judge, render
from metalora_core.synthfaces.experiment import (METHODS, ReproConfig, first_reaching, held_out, reach_analysis,
                                                 training_images)
from metalora_core.synthfaces.models import SmallFluxConfig, encode_text
from references import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    return load_script(f"experiments/{name}.py")


def _finite(d: dict) -> bool:
    return all(math.isfinite(d[k]) for k in ("mean", "std")) and d["n"] >= 1


def test_smoke_run_writes_results_table_and_figure(tmp_path, capsys):
    out = tmp_path / "smoke"
    assert _load_script("reproduce").main(["--out", str(out), "--smoke"]) == 0
    results = json.loads((out / "results.json").read_text())
    steps = results["config"]["checkpoints"]
    n = results["n_identities"] * results["runs_per_identity"]
    assert set(results["methods"]) == set(METHODS)
    for m in METHODS:
        assert list(results["methods"][m]["steps"]) == [str(s) for s in steps]
        for s in steps:
            cell = results["methods"][m]["steps"][str(s)]
            for metric in ("identity", "prompt"):
                assert _finite(cell[metric]) and cell[metric]["n"] == n
            assert -1.0 <= cell["identity"]["mean"] <= 1.0 and 0.0 <= cell["prompt"]["mean"] <= 1.0
    assert _finite(results["base_model"]["identity"])
    assert len(results["runs"]) == n * len(METHODS)
    # plain LoRA trains on the photo alone, the other two on the crop grid
    by = {r["method"]: r["train_images"] for r in results["runs"]}
    assert by["lora"] == 1 and by["meta_lora"] > 1 and by["lora_aug"] == by["meta_lora"]
    assert results["reach"]["target_step"] == steps[-1]
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 2 + len(steps)  # header, base-model row, one row per checkpoint
    assert "Meta-LoRA" in capsys.readouterr().out
    fig = Image.open(out / "figure.png")
    assert fig.size[0] > 400 and np.unique(np.asarray(fig.convert("L"))).size > 2
    assert Image.open(out / "samples.png").size[1] >= 80 * (1 + 2 * len(METHODS))
    for f in ("autoencoder", "base", "embedder", "prior"):
        assert (out / "artefacts" / f"{f}.safetensors").is_file()


def test_seed_changes_the_held_out_identities_and_keeps_them_out_of_training():
    a, b = held_out(ReproConfig(seed=0, identities=3)), held_out(ReproConfig(seed=1, identities=3))
    assert {x.identity.index for x in a}.isdisjoint({x.identity.index for x in b})
    assert a[0].identity != b[0].identity
    assert np.abs(np.asarray(a[0].photo, float) - np.asarray(held_out(ReproConfig(seed=0, identities=1))[0].photo,
                                                               float)).max() == 0  # repeatable
    for x in a + b:
        assert x.identity.index >= render.HELDOUT_OFFSET  # training draws below this
        assert len(x.references) == 8
        # the references are other images: none equals the Stage-2 photo
        assert all(np.asarray(r).shape == (32, 32, 3) for r in x.references)


def test_identity_traits_are_fixed_and_views_vary():
    i1, i2 = render.make_identity(5), render.make_identity(5)
    assert i1 == i2 and render.make_identity(6) != i1
    g = np.random.default_rng(0)
    views = [render.render(i1, render.random_view(g)) for _ in range(3)]
    assert len({np.asarray(v).tobytes() for v in views}) == 3


def test_context_score_names_the_rendered_background():
    ident = render.make_identity(1)
    g = np.random.default_rng(0)
    for ctx in render.CONTEXTS:
        im = render.render(ident, render.random_view(g, context=ctx))
        probs = judge.context_probabilities(im)
        assert max(probs, key=probs.get) == ctx and judge.context_score(im, ctx) > 0.9
    with pytest.raises(ValueError, match="unknown context"):
        judge.context_score(im, "purple")
    with pytest.raises(ValueError, match="unknown context"):
        render.random_view(g, context="purple")


def test_identity_similarity_needs_references():
    emb = judge.IdentityEmbedder()
    im = render.render(render.make_identity(0), render.random_view(np.random.default_rng(0)))
    with pytest.raises(ValueError, match="reference"):
        judge.identity_similarity(emb, [im], [])
    assert judge.identity_similarity(emb, [im], [im])[0] == pytest.approx(1.0, abs=1e-5)


def test_training_images_follow_the_method():
    item = held_out(ReproConfig(identities=1))[0]
    assert len(training_images(item, "lora", 0)) == 1
    crops = training_images(item, "meta_lora", 0)
    assert len(crops) > 5 and all(im.size[0] % 8 == 0 and im.size[1] % 8 == 0 for im in crops)
    assert len({im.size for im in crops}) == 3  # the grid's 16:9/4:3, 1:1 and 3:4/9:16 buckets at 32x32 area


def test_text_conditioning_is_fixed_per_word():
    a, b = encode_text("a photo of a face on a red background", 32), encode_text("a photo of a face on a red background", 32)
    c = encode_text("a photo of a face on a blue background", 32)
    assert torch.equal(a.prompt_embeds, b.prompt_embeds) and not torch.equal(a.prompt_embeds, c.prompt_embeds)
    with pytest.raises(ValueError, match="words"):
        encode_text(" ".join(["w"] * 20), 32)


def test_reach_analysis_finds_the_first_step_at_the_target():
    cfg = ReproConfig(identities=1, runs_per_identity=1, checkpoints=(1, 2, 3))
    curves = {"lora": (0.1, 0.2, 0.5), "meta_lora": (0.3, 0.6, 0.7), "lora_aug": (0.1, 0.1, 0.2)}
    runs = [{"method": m, "identity": 0, "seed": 0, "scores": {s: {"identity": v, "prompt": 0.5}
                                                                for s, v in zip(cfg.checkpoints, c)}}
            for m, c in curves.items()]
    r = reach_analysis(runs, cfg)
    assert r["target_value"] == 0.5
    assert r["meta_lora"]["mean_curve_first_step_at_or_above_target"] == 2 and r["meta_lora"]["steps_saved_vs_lora"] == 1
    assert r["lora_aug"]["mean_curve_first_step_at_or_above_target"] is None
    assert first_reaching({1: 0.0, 2: 1.0}, 0.5) == 2


def test_configs_refuse_bad_values():
    with pytest.raises(ValueError, match="checkpoints"):
        ReproConfig(checkpoints=(250, 125))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        SmallFluxConfig(head_dim=8)
    from metalora_core.synthfaces.artefacts import BuildConfig

    with pytest.raises(ValueError, match="meta_warmup_steps"):
        BuildConfig(meta_warmup_steps=500, meta_bucket_steps=200)
    with pytest.raises(ValueError, match="base_steps"):
        BuildConfig(base_steps=0)
    with pytest.raises(ValueError, match="context_dropout"):
        BuildConfig(context_dropout=1.0)
    with pytest.raises(ValueError, match="meta_lr"):
        BuildConfig(meta_lr=0.0)
    with pytest.raises(ValueError, match="identities"):
        ReproConfig(identities=0)
    with pytest.raises(ValueError, match="r2"):
        ReproConfig(r2=0)


def test_missing_artefacts_name_the_rebuild_command(tmp_path):
    from metalora_core.synthfaces.artefacts import load_artefacts

    with pytest.raises(FileNotFoundError, match="build_artefacts.py"):
        load_artefacts(tmp_path)


def test_demo_personalizes_a_held_out_identity_of_the_small_domain(tmp_path, capsys):
    from metalora_core.cli import main
    from metalora_core.formats.lora import load_lora
    from metalora_core.formats.prior import load_prior

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4"]) == 0
    assert "identity score base" in capsys.readouterr().out
    for name in ("comparison.png", "crops.png", "lora.safetensors", "loss.png", "report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and report["crops"] >= 5
    for k in ("identity_score_base_mean", "identity_score_metalora_mean", "prompt_score_metalora_mean",
              "identity_score_lora_aug_mean", "prompt_score_lora_aug_mean", "identity_score_lora_mean",
              "prompt_score_lora_mean"):
        assert math.isfinite(report[k]) and -1.0 <= report[k] <= 1.0
    tensors, meta = load_lora(out / "lora.safetensors")
    # the gated assay once its five gates passed, else the first domain's artefacts
    from metalora_core.synthfaces.demo import assay_passed, default_artefacts

    folder = ROOT / "experiments" / ("assay" if assay_passed(ROOT / "experiments" / "assay") else "artefacts")
    assert default_artefacts() == folder and report["artefacts"] == str(folder)
    assert meta["prior_sha256"] == load_prior(folder / "prior.safetensors").sha256
    # the gated assay's rank (what its positive control and comparison used), else rank 1
    cfg = folder / "assay_config.json"
    rank = json.loads(cfg.read_text())["rank"] if cfg.is_file() else 1
    assert report["r2"] == rank
    # without --steps the demo trains the assay's Stage-2 length (its last checkpoint), else 375
    from metalora_core.synthfaces import demo

    steps = json.loads(cfg.read_text())["checkpoints"][-1] if cfg.is_file() else 375
    assert demo._load(folder)[2:] == (rank, steps)
    assert {t.shape[1] for k, t in tensors.items() if k.endswith("lora_B.weight")} == {rank}
    assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith("lora_B.weight"))
    sheet = Image.open(out / "comparison.png")
    assert sheet.size[0] >= 8 * 96 and sheet.size[1] >= 5 * (96 + 24)  # photo, base, LoRA, LoRA + aug and Meta-LoRA rows


def test_demo_without_artefacts_names_the_rebuild_command(tmp_path, capsys):
    from metalora_core.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "2", "--artefacts", str(tmp_path / "none")]) == 2
    assert "build_artefacts.py" in capsys.readouterr().err


def test_calibration_smoke_chooses_a_rate_on_identities_the_comparison_never_scores(tmp_path, capsys):
    from metalora_core.synthfaces.experiment import SMOKE_CALIBRATION

    out = tmp_path / "cal"
    assert _load_script("calibrate").main(["--out", str(out), "--smoke"]) == 0
    res = json.loads((out / "calibration.json").read_text())
    assert res["chosen_lr"] in res["lrs"] == [float(x) for x in SMOKE_CALIBRATION["lrs"]]
    last = str(res["config"]["checkpoints"][-1])
    best = max(res["lrs"], key=lambda lr: res["table"][repr(lr)][last]["photo"]["mean"])
    assert res["chosen_lr"] == best
    scored = {x.identity.index for s in range(3) for x in held_out(ReproConfig(seed=s, identities=8))}
    assert res["identities"] and scored.isdisjoint(res["identities"])
    chosen = f"lr = {res['chosen_lr']:g}"
    assert chosen in (out / "table.md").read_text() and chosen in capsys.readouterr().out


def test_committed_artefacts_and_calibration_use_the_domains_one_learning_rate():
    from metalora_core.synthfaces.artefacts import DOMAIN_LR

    from metalora_core.synthfaces.artefacts import BuildConfig

    manifest = json.loads((ROOT / "experiments" / "artefacts" / "manifest.json").read_text())
    assert BuildConfig().meta_lr == DOMAIN_LR == ReproConfig().lr
    assert manifest["build"].get("meta_lr", 4e-4) == DOMAIN_LR  # the committed prior: Stage-1 at MetaTrainConfig's 4e-4
    cal = json.loads((ROOT / "experiments" / "results" / "calibration" / "calibration.json").read_text())
    assert cal["label"] == "full" and cal["chosen_lr"] == DOMAIN_LR
    results = json.loads((ROOT / "experiments" / "results" / "results.json").read_text())
    assert results["config"]["lr"] == DOMAIN_LR and results["artefacts"]["prior"]["sha256"] == manifest["prior"]["sha256"]
