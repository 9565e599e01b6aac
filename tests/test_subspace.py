"""The prior-subspace diagnostic (metalora_core/synthfaces/subspace.py, experiments/prior_subspace.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metalora_core.lora.adapter import AdapterSet, LoRAAdapter
from metalora_core.synthfaces.subspace import capture, weight_gradients
from metalora_core.lora.flow import add_noise, sample_sigmas, velocity_target
from metalora_core.train.stage2 import Stage2Config
from references import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke_arts(tmp_path_factory):
    from metalora_core.synthfaces.artefacts import SMOKE_BUILD, build_artefacts

    return build_artefacts(tmp_path_factory.mktemp("arts"), SMOKE_BUILD)


def _loss(host, cond, latents, name, shape, delta, draws, seed):
    """The mean Stage-2 loss of ``draws`` seeded draws with ``delta`` added to one layer's weight."""
    fin, fout = shape
    a = LoRAAdapter(fin, fout, rank=fin, mid=False).double()  # float64 like the host below
    with torch.no_grad():
        a.down.copy_(torch.eye(fin))
        a.up.copy_(delta)
    handle = host.attach(AdapterSet({name: a}, mode="lora", preset=None))
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    try:
        with host.training(), torch.no_grad():
            for i in range(draws):  # flow_step_loss's draws, with the mean square in float64
                x0 = latents[i % len(latents)][None].double()
                noise = torch.randn(x0.shape, generator=gen).double()
                sigma = sample_sigmas(1, generator=gen, mode=Stage2Config().sigma_mode, shift=None)
                pred = host.predict(add_noise(x0, noise, sigma), sigma, cond).double()
                total += float(torch.mean((pred - velocity_target(x0, noise)) ** 2))
        return total / draws
    finally:
        handle.remove()


def test_weight_gradients_match_central_differences_of_the_loss(smoke_arts):
    from metalora_core.hosts.diffusers_flux import DiffusersFluxHost
    from metalora_core.lora.layers import resolve_targets
    from metalora_core.synthfaces.experiment import ReproConfig, held_out, training_images

    host = DiffusersFluxHost(smoke_arts.transformer.double(), vae=smoke_arts.vae)
    try:
        cond = smoke_arts.cond(None)
        images = training_images(held_out(ReproConfig(identities=1))[0], "meta_lora", 0)[:3]
        grads = weight_gradients(host, cond, images, "all", draws=3, seed=5)
        shapes = resolve_targets("all", host.dims)
        assert set(grads) == set(shapes)
        latents = host.encode_images(images)
        names = [sorted(shapes)[0], sorted(shapes)[-1]]
        for name in names:
            g = grads[name]
            assert g.shape == (shapes[name][1], shapes[name][0]) and g.abs().max() > 0
            g2 = torch.Generator().manual_seed(1)
            for e in (g / g.norm(), torch.randn(g.shape, generator=g2, dtype=torch.float64)):
                e = e / e.norm()
                eps = 1e-4
                fd = (_loss(host, cond, latents, name, shapes[name], eps * e, 3, 5)
                      - _loss(host, cond, latents, name, shapes[name], -eps * e, 3, 5)) / (2 * eps)
                assert fd == pytest.approx(float((g * e).sum()), rel=1e-3, abs=1e-4 * float(g.norm()))  # G: float32 path
    finally:
        smoke_arts.transformer.float()


def test_capture_shares_are_exact_on_known_subspaces():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]  # orthonormal columns
    inside, outside = basis[:, :3].T, basis[:, 3:6].T  # (3, 16) each, orthogonal row spaces
    g = torch.randn(5, 3, dtype=torch.float64) @ inside  # rows in span(inside)
    assert capture({"l": g}, {"l": inside})["prior"] == pytest.approx(1.0)
    assert capture({"l": g}, {"l": outside})["prior"] == pytest.approx(0.0, abs=1e-12)
    rank1 = torch.randn(5, 1, dtype=torch.float64) @ inside[:1]
    shares = capture({"l": rank1}, {"l": outside}, shared={"l": rank1})
    assert shares["best_1"] == pytest.approx(1.0) and shares["shared"] == pytest.approx(1.0)
    full = torch.randn(64, 16, dtype=torch.float64)
    rand = capture({"l": full}, {"l": outside}, random_draws=64)["random"]
    assert rand == pytest.approx(3 / 16, abs=0.05)  # a random 3-row Down: ~ r1 / in of the energy
    # layers add by energy: a layer with 100x the energy dominates the share
    two = capture({"a": 10 * g, "b": torch.randn(5, 16, dtype=torch.float64) @ outside.T @ outside},
                  {"a": inside, "b": inside})
    assert two["prior"] > 0.95


def test_smoke_script_writes_the_table(tmp_path, capsys):
    mod = load_script("experiments/prior_subspace.py")
    out = tmp_path / "sub"
    assert mod.main(["--out", str(out), "--smoke"]) == 0
    res = json.loads((out / "subspace.json").read_text())
    assert set(res["groups"]) == {"held_out", "held_out_specific", "stage1_training", "stage1_training_specific"}
    for group, rows in res["rows"].items():
        for r in rows:
            assert all(0.0 <= v <= 1.0 + 1e-9 for v in r.values())
            assert r["best_r1"] >= r["prior"] - 1e-9 and r["best_r1"] >= r["best_1"] - 1e-9
    assert "| held_out |" in (out / "table.md").read_text() and "prior" in capsys.readouterr().out


def test_committed_subspace_results_are_of_the_committed_prior():
    res = json.loads((ROOT / "experiments" / "results" / "subspace" / "subspace.json").read_text())
    from metalora_core.formats.prior import load_prior

    prior = load_prior(ROOT / "experiments" / "artefacts" / "prior.safetensors")
    assert res["label"] == "full" and res["prior_sha256"] == prior.sha256 and res["r1"] == prior.r1


def test_stage1_length_smoke_tracks_down_along_one_run_and_compares_snapshots(tmp_path, capsys):
    from metalora_core.synthfaces.stage1_length import SMOKE_LENGTH, LengthConfig

    mod = load_script("experiments/stage1_length.py")
    out = tmp_path / "len"
    assert mod.main(["--out", str(out), "--smoke"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [p["step"] for p in res["curve"]] == list(SMOKE_LENGTH.snapshots)
    assert res["curve"][0]["stage1_loss_since_last_snapshot"] is None
    assert all(p["stage1_loss_since_last_snapshot"]["n"] == b - a
               for p, a, b in zip(res["curve"][1:], SMOKE_LENGTH.snapshots, SMOKE_LENGTH.snapshots[1:]))
    # Down moves between snapshots: each snapshot is its own matrix, not a reference to the live one
    shares = [p["prior_share"]["mean"] for p in res["curve"]]
    assert len(set(shares)) == len(shares)
    assert set(res["identity"]) == {"lora"} | {f"meta_lora@{s}" for s in SMOKE_LENGTH.compared}
    assert "Stage-1 length" in capsys.readouterr().out
    with pytest.raises(ValueError, match="snapshots"):
        LengthConfig(steps=10, snapshots=(0, 5))
    with pytest.raises(ValueError, match="compared"):
        LengthConfig(compared=(123,))
