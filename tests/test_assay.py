"""The gated assay of the small domain: gates, their statistics, the lossless latent, domain 2 and
the staged, resumable build (experiments/build_assay.py)."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from metalora_core.synthfaces import gates, render
from metalora_core.synthfaces.gates import Gate, GateFailed, laplacian_energy, mean_ci, require, same_other
from references import load_script

def _script(name: str):
    return load_script(f"experiments/{name}.py")


def test_gate_passes_only_when_every_check_holds_and_fails_in_one_line():
    ok = Gate("latent", {"reconstruction_same": 0.8, "real_same": 0.9, "other": 0.0})
    assert ok.passed and require(ok) is ok
    d = ok.to_dict()
    assert d["passed"] is True and d["threshold"]["reconstruction_same"] == ">= 0.75" and d["value"]["other"] == 0.0
    bad = Gate("latent", {"reconstruction_same": 0.51, "real_same": 0.9, "other": 0.0})
    assert not bad.passed and bad.checks() == {"reconstruction_same": False, "real_same": True, "other": True}
    with pytest.raises(GateFailed) as e:
        require(bad)
    msg = str(e.value)
    assert "\n" not in msg and "gate latent FAILED" in msg and "0.510" in msg and ">= 0.75" in msg
    # an upper bound and a strict bound
    assert not Gate("latent", {"reconstruction_same": 0.8, "real_same": 0.9, "other": 0.06}).passed
    assert not Gate("stage1_signal", {"paired_difference_ci_high": 0.0}).passed
    assert Gate("stage1_signal", {"paired_difference_ci_high": -1e-4}).passed
    assert not Gate("base", {"nearest_identity_cosine": float("nan"), "realism": 1.0, "sharpness_ratio": 1.0}).passed
    # sharpness is a range: blurred samples fail below it, noisy ones above it
    assert Gate("base", {"nearest_identity_cosine": 0.7, "realism": 0.6, "sharpness_ratio": 1.0}).passed
    assert not Gate("base", {"nearest_identity_cosine": 0.7, "realism": 0.6, "sharpness_ratio": 0.4}).passed
    assert not Gate("base", {"nearest_identity_cosine": 0.7, "realism": 0.3, "sharpness_ratio": 1.0}).passed
    noisy = Gate("base", {"nearest_identity_cosine": 0.7, "realism": 0.6, "sharpness_ratio": 4.3})
    assert not noisy.passed and "needs in [0.5, 2]" in noisy.line() and noisy.to_dict()["threshold"]["sharpness_ratio"] == "in [0.5, 2]"
    with pytest.raises(ValueError, match="lacks values"):
        Gate("judge", {"degraded_same": 0.9})
    with pytest.raises(ValueError, match="unknown gate"):
        Gate("nope", {})
    assert set(gates.ORDER) == set(gates.THRESHOLDS)


def test_mean_ci_is_the_t_interval():
    r = mean_ci([1.0, 2.0, 3.0, 4.0])
    se = np.std([1, 2, 3, 4], ddof=1) / 2
    assert r["n"] == 4 and r["mean"] == 2.5 and r["se"] == pytest.approx(se)
    assert r["ci95"] == pytest.approx([2.5 - 3.182 * se, 2.5 + 3.182 * se])
    assert mean_ci([0.3])["ci95"] == [-math.inf, math.inf]
    assert gates.t975(200) == 1.96 and gates.t975(35) == 2.021  # between rows: the next row's (wider) value
    with pytest.raises(ValueError):
        mean_ci([])


def test_sharpness_and_same_other():
    g = np.random.default_rng(0)
    sharp = g.random((2, 16, 16, 3))
    smooth = np.repeat(np.linspace(0, 1, 16)[None, :, None, None], 16, 2).transpose(0, 2, 1, 3).repeat(3, 3)
    assert laplacian_energy(sharp) > 10 * laplacian_energy(np.broadcast_to(smooth, (2, 16, 16, 3)))
    e = [np.array([[1.0, 0], [1.0, 0]]), np.array([[0, 1.0], [0, 1.0]])]
    assert same_other(e) == (1.0, 0.0)


def test_space_to_depth_latent_is_lossless_and_runs_through_encode_images():
    from PIL import Image

    from metalora_core.hosts.diffusers_flux import encode_images, pil_to_tensor
    from metalora_core.synthfaces.models import SpaceToDepthLatent, decode_latents

    ims = [render.render(render.make_identity(k, 2), render.random_view(np.random.default_rng(k), domain=2))
           for k in range(3)]
    lat = SpaceToDepthLatent(4)
    lat.fit(torch.stack([pil_to_tensor(im) for im in ims]))
    z = encode_images(lat, ims + [ims[0].resize((40, 24), Image.Resampling.BILINEAR)])
    assert z[0].shape == (48, 8, 8) and z[3].shape == (48, 6, 10)
    assert abs(float(z[0].std()) - 1.0) < 0.5  # scaled per channel
    back = decode_latents(lat, torch.stack(z[:3]))
    assert float((back - torch.stack([pil_to_tensor(im) for im in ims])).abs().max()) < 1e-5
    with pytest.raises(ValueError, match="factor"):
        SpaceToDepthLatent(0)


def test_domain_2_identities_carry_surviving_traits_and_domain_1_is_unchanged():
    a, b = render.make_identity(7, 2), render.make_identity(7, 2)
    assert a == b and a.domain == 2 and a != render.make_identity(7)
    one = render.make_identity(7)
    assert one.domain == 1 and not one.glasses and not one.beard
    many = [render.make_identity(k, 2) for k in range(200)]
    assert 40 < sum(m.glasses for m in many) < 160 and 40 < sum(m.beard for m in many) < 160
    assert {(m.head_w, m.head_h) for m in many} == set(render.HEAD_ASPECTS)
    with pytest.raises(ValueError, match="domain"):
        render.make_identity(1, 3)
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    v1, v2 = render.random_view(g1), render.random_view(g2, domain=2)
    assert abs(v2.roll) <= 4 and abs(v2.yaw) <= 0.3 and v1 != v2
    # glasses draw dark rims: the same identity and view with and without them differ
    glasses = next(m for m in many if m.glasses)
    plain = dataclasses.replace(glasses, glasses=False)
    view = render.random_view(np.random.default_rng(0), domain=2)
    assert np.abs(np.asarray(render.render(glasses, view), float) - np.asarray(render.render(plain, view), float)).max() > 60


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    from metalora_core.synthfaces.assay import SMOKE_ASSAY, build_assay

    out = tmp_path_factory.mktemp("assay")
    gates_ = build_assay(out, SMOKE_ASSAY, enforce=False)
    return out, gates_


def test_smoke_build_writes_every_stage_and_all_five_gates(smoke_build):
    out, g = smoke_build
    assert list(g) == ["latent", "judge", "base", "positive_control", "stage1_signal"]
    for name, d in g.items():
        assert set(d) >= {"value", "threshold", "passed"} and d["passed"] == Gate(name, d["value"]).passed
    for f in ("latent.safetensors", "judge.safetensors", "base.safetensors", "prior.safetensors", "gates.json",
              "positive_control.json", "prior.json", "build_log.txt", "assay_config.json", "seconds.json",
              "base_samples.png"):
        assert (out / f).is_file(), f
    runs = (out / "positive_control_runs.jsonl").read_text().splitlines()
    assert len(runs) == 1 and json.loads(runs[0])["lr"] == 1e-3
    prior = json.loads((out / "prior.json").read_text())
    assert prior["probe"]["pooled"]["n"] == 2  # 2 identities x 1 visit, own vs the other's Mid/Up
    assert all(p["identity"] != p["other"] for p in prior["probe"]["pairs"])
    log = (out / "build_log.txt").read_text()
    assert "gate latent" in log and "gate stage1_signal" in log


def test_a_rerun_continues_from_the_saved_stages_and_a_failed_gate_stops_it(smoke_build, tmp_path):
    import shutil

    from metalora_core.synthfaces.assay import SMOKE_ASSAY, build_assay, load_assay

    out, _ = smoke_build
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    secs = json.loads((copy / "seconds.json").read_text())
    stamp = (copy / "base.safetensors").stat().st_mtime_ns
    (copy / "prior.safetensors").unlink()
    (copy / "positive_control.json").unlink()  # the stage reruns from its saved runs: none is trained again
    runs_before = (copy / "positive_control_runs.jsonl").read_text()
    gates_ = build_assay(copy, SMOKE_ASSAY, enforce=False)
    assert (copy / "positive_control_runs.jsonl").read_text() == runs_before
    assert (copy / "positive_control.json").is_file()
    assert (copy / "base.safetensors").stat().st_mtime_ns == stamp  # not retrained
    assert json.loads((copy / "seconds.json").read_text())["base"] == secs["base"]
    assert (copy / "prior.safetensors").is_file() and "stage1_signal" in gates_
    # enforced, the smoke build (a few steps) stops at its first failing gate, with one line
    first_failed = next(n for n in gates.ORDER if not gates_[n]["passed"])
    with pytest.raises(GateFailed, match=f"gate {first_failed} FAILED"):
        build_assay(copy, SMOKE_ASSAY)
    # the comparison refuses an assay with a failed gate
    with pytest.raises(GateFailed):
        load_assay(copy)
    with pytest.raises(ValueError, match="stage 'judge' had other settings"):
        build_assay(copy, dataclasses.replace(SMOKE_ASSAY, judge_steps=4))
    # growing the base model keeps latent and judge, rebuilds base and every later stage
    judge_stamp = (copy / "judge.safetensors").stat().st_mtime_ns
    with pytest.raises(ValueError, match="--rebuild-from base"):
        build_assay(copy, dataclasses.replace(SMOKE_ASSAY, base_steps=4), enforce=False, allow_changes="positive_control")
    # a Stage-1 checkpoint of the old base model must not be resumed on the new one: it is dropped
    (copy / "prior_checkpoint.safetensors").write_bytes(b"a checkpoint of the previous base model")
    build_assay(copy, dataclasses.replace(SMOKE_ASSAY, base_steps=4), enforce=False, allow_changes="base")
    assert (copy / "judge.safetensors").stat().st_mtime_ns == judge_stamp
    assert (copy / "base.safetensors").stat().st_mtime_ns != stamp
    assert json.loads((copy / "assay_config.json").read_text())["base_steps"] == 4
    assert not (copy / "prior_checkpoint.safetensors").exists()
    assert "settings of stage base changed" in (copy / "build_log.txt").read_text()


def test_build_script_prints_one_line_and_exits_3_on_a_failed_gate(smoke_build, tmp_path, capsys):
    import shutil

    out, _ = smoke_build
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    # the script enforces gates unless --smoke; the saved smoke stages fail them
    cfg = json.loads((copy / "assay_config.json").read_text())
    assert cfg["judge_steps"] == 3
    mod = _script("build_assay")
    from metalora_core.synthfaces import assay

    orig = assay.AssayConfig
    try:
        assay.AssayConfig = lambda: assay.SMOKE_ASSAY  # the script's full config, shrunk to the saved smoke one
        rc = mod.main(["--out", str(copy)])
    finally:
        assay.AssayConfig = orig
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 3 and len(printed) == 1 and "FAILED" in printed[0] and "the build stops here" in printed[0]


def test_build_script_overrides_reach_the_saved_config_and_bad_ones_are_refused(tmp_path, capsys):
    import torch

    mod = _script("build_assay")
    out = tmp_path / "o"
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--out", str(out), "--smoke", "--stop-after", "latent", "--rank", "2",
                         "--checkpoints", "1,3", "--heads", "5", "--base-steps", "4", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    cfg = json.loads((out / "assay_config.json").read_text())
    assert (cfg["rank"], cfg["checkpoints"], cfg["heads"], cfg["base_steps"]) == (2, [1, 3], 5, 4)
    for bad, says in ((["--checkpoints", "3,1"], "checkpoints must be increasing"),
                      (["--checkpoints", "1,x"], "--checkpoints '1,x'")):
        with pytest.raises(SystemExit):
            mod.main(["--out", str(tmp_path / "bad"), "--smoke", *bad])
        assert says in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_shuffled_tiles_keep_the_pixels_and_lose_the_layout():
    from metalora_core.synthfaces.assay import shuffle_patches

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    y = shuffle_patches(x, 4, 0)
    assert y.shape == x.shape and not torch.equal(x, y)
    for i in range(2):
        assert torch.equal(x[i].flatten().sort().values, y[i].flatten().sort().values)  # same pixels
        tiles = {tuple(y[i, :, a:a + 4, b:b + 4].flatten().tolist()) for a in (0, 4) for b in (0, 4)}
        assert tiles == {tuple(x[i, :, a:a + 4, b:b + 4].flatten().tolist()) for a in (0, 4) for b in (0, 4)}


def test_assay_config_refuses_a_model_narrower_than_its_tokens():
    from metalora_core.synthfaces.assay import AssayConfig

    with pytest.raises(ValueError, match="width 128 .* must exceed the 192 values"):
        AssayConfig(latent_factor=4, heads=8)
    assert AssayConfig(latent_factor=4, heads=13).heads == 13 and AssayConfig().latent_factor == 2


def test_base_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path):
    from metalora_core.synthfaces.assay import SMOKE_ASSAY, build_base_transformer
    from metalora_core.synthfaces.models import encode_text, stack_conds, train_base

    cond = encode_text("a photo of a face", SMOKE_ASSAY.model.text_dim)
    data = torch.randn(16, 48, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = {"n": 0, "fail_at": None}

    def batches(gen):
        calls["n"] += 1
        if calls["fail_at"] is not None and calls["n"] == calls["fail_at"]:
            raise KeyboardInterrupt  # an interrupt in the middle of the run
        idx = torch.randint(16, (4,), generator=gen)
        return data[idx], stack_conds([cond] * 4)

    ref = build_base_transformer(SMOKE_ASSAY, 48)
    ref_losses = train_base(ref, batches, steps=5, seed=3, warmup=2, log_every=0)
    ckpt = tmp_path / "ckpt.safetensors"
    run = build_base_transformer(SMOKE_ASSAY, 48)
    calls.update(n=0, fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        train_base(run, batches, steps=5, seed=3, warmup=2, log_every=0, checkpoint_path=ckpt, checkpoint_every=2)
    assert ckpt.is_file()
    calls.update(n=0, fail_at=None)
    again = build_base_transformer(SMOKE_ASSAY, 48)
    losses = train_base(again, batches, steps=5, seed=3, warmup=2, log_every=0, checkpoint_path=ckpt, checkpoint_every=2)
    assert calls["n"] == 3  # steps 3..5 only
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    for (k, a), (_, b) in zip(ref.state_dict().items(), again.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    with pytest.raises(ValueError, match="checkpoint of 5 steps"):
        train_base(build_base_transformer(SMOKE_ASSAY, 48), batches, steps=6, seed=3, checkpoint_path=ckpt)


def test_demo_refuses_an_assay_whose_gates_failed(smoke_build, tmp_path, capsys):
    from metalora_core.cli import main
    from metalora_core.synthfaces.demo import assay_passed

    out, _ = smoke_build
    assert not assay_passed(out) and not assay_passed(tmp_path)
    assert main(["demo", "--out", str(tmp_path / "d"), "--steps", "2", "--artefacts", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gate latent FAILED" in err
    assert not (tmp_path / "d" / "comparison.png").exists()


def test_an_interrupted_stage1_resumes_to_the_same_prior_and_probe(smoke_build, tmp_path, monkeypatch):
    import metalora_core.synthfaces.assay as assay
    from metalora_core.formats.prior import load_prior
    from metalora_core.synthfaces.assay import SMOKE_ASSAY, BuildLog, load_assay, stage_prior

    out, _ = smoke_build
    arts = load_assay(out, require_gates=False)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    ref_gate, _ = stage_prior(SMOKE_ASSAY, ref_dir, arts, BuildLog(ref_dir))
    real = assay.probe_losses
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # in the middle of the end-of-visit probe
        return real(*a, **k)

    monkeypatch.setattr(assay, "probe_losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stage_prior(SMOKE_ASSAY, run_dir, arts, BuildLog(run_dir))
    assert (run_dir / "prior_checkpoint.safetensors").is_file() and not (run_dir / "prior.safetensors").exists()
    monkeypatch.setattr(assay, "probe_losses", real)
    gate, _ = stage_prior(SMOKE_ASSAY, run_dir, arts, BuildLog(run_dir))
    assert "resuming Stage-1 at step 3" in (run_dir / "build_log.txt").read_text()
    a, b = load_prior(ref_dir / "prior.safetensors"), load_prior(run_dir / "prior.safetensors")
    for n in a.downs:
        assert torch.allclose(a.downs[n], b.downs[n], atol=1e-6), n
    assert gate.value == pytest.approx(ref_gate.value)
    assert not (run_dir / "prior_checkpoint.safetensors").exists()
