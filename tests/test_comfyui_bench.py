"""The per-family benchmark (bench/families.py) in a real ComfyUI: its smoke run gives a row for every
family and ComfyUI path with finite positive figures, and its saved-bytes counter sees through the
generic host's copy-on-write hooks (the figures it prints are those of what is kept). Needs
``COMFYUI_PATH``."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from comfy_fixtures import REPO, SKIP_REASON, comfyui_path, load_comfy_in_process, pack

if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)

ROWS = {("flux1", "bare"), ("flux1", "fast"), ("flux1", "generic"), ("flux2", "bare"), ("flux2", "generic"),
        ("zimage", "bare"), ("zimage", "generic")}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    return load_comfy_in_process(tmp_path_factory.mktemp("comfy_bench"), custom_node_paths=[REPO])


def _families_bench():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import families
    finally:
        sys.path.remove(str(REPO / "bench"))
    return families


def test_families_bench_smoke_has_every_family_and_path():
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path()), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "families.py"), "--smoke"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    record = json.loads(lines[-1])
    assert record["mode"] == "smoke" and record["threads"] == 1 and record["comfyui"]
    rows = {(r["family"], r["path"]): r for r in record["rows"]}
    assert set(rows) == ROWS and len(record["rows"]) == len(ROWS)
    for key, r in rows.items():
        for k in ("s_per_step", "saved_bytes", "kernels", "image_tokens", "text_tokens"):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (key, k, r[k])
        ratios = [r[f"{k}_vs_bare"] for k in ("s_per_step", "saved_bytes", "kernels")]
        if key[1] == "bare":
            assert ratios == [None] * 3 and r["adapted_layers"] == 0
        else:
            assert all(math.isfinite(x) and x > 0 for x in ratios), (key, ratios)
            assert r["adapted_layers"] > 0 and r["kernels"] > rows[(key[0], "bare")]["kernels"], key
    assert rows[("flux1", "generic")]["s_per_step_vs_fast"] > 0
    # the markdown table: a header, a rule and one line per row, each with every column filled as it should be
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + len(ROWS), out.stdout
    for ln in table[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == 9 and cells[0] in ("FLUX.1-dev", "FLUX.2", "Z-Image"), ln
        assert float(cells[2].split()[0]) > 0 and cells[5].endswith(" MiB") and int(cells[7].replace(",", "")) > 0, ln


def _residual_block(x: torch.Tensor, w: torch.Tensor, in_place: bool) -> torch.Tensor:
    """ComfyUI's block pattern: a LayerNorm reads the residual stream, then it is added to in place."""
    h = x * 2
    for _ in range(3):
        n = torch.nn.functional.layer_norm(h, h.shape[-1:]) @ w
        if in_place:
            h += torch.tanh(n)
        else:
            h = h + torch.tanh(n)
    return (h ** 2).sum()


def test_kept_for_backward_counts_what_copy_on_write_keeps(comfy):
    """Under the generic host's copy-on-write hooks, ``SavedTensors`` alone sees nothing of the
    forward; the bench's counter sees what is kept: the in-place forward, with the copies made
    before each write, keeps exactly what the out-of-place one keeps."""
    families = _families_bench()
    cow = pack("nodes.generic_host").CopyOnWriteSaved
    x, w = torch.randn(64, 32, requires_grad=True), torch.randn(32, 32)
    plain = families.SavedTensors(exclude=[x, w])
    with plain:
        loss = _residual_block(x, w, in_place=False)
    loss.backward()
    hidden = families.SavedTensors(exclude=[x, w])
    with hidden, cow().active():
        loss = _residual_block(x, w, in_place=True)
    loss.backward()
    kept = families.KeptForBackward(cow, exclude=[x, w])
    with kept, cow().active():
        loss = _residual_block(x, w, in_place=True)
    loss.backward()
    assert plain.nbytes > 3 * 64 * 32 * 4, plain.nbytes  # every LayerNorm input, at least
    assert hidden.nbytes == 0
    assert kept.nbytes == plain.nbytes, (kept.nbytes, plain.nbytes)  # and the class is as it was:
    assert cow.__dict__["active"] is kept._restore[1] and cow.__dict__["_pack"] is kept._restore[0]


def test_comfyui_options_of_another_import_are_refused(comfy):
    with pytest.raises(RuntimeError, match=r"imported in this process with options \[\]; "
                                           r"\['--use-pytorch-cross-attention'\] need a process of their own"):
        load_comfy_in_process(comfy.base_dir, comfy_args=["--use-pytorch-cross-attention"])


def test_a_row_without_a_finite_positive_figure_fails_the_bench():
    families = _families_bench()
    row = {"title": "FLUX.2", "path": "generic", "s_per_step": 0.5, "saved_bytes": 10, "kernels": 3}
    families.check_rows([row])
    for k, v in (("s_per_step", float("nan")), ("saved_bytes", 0), ("kernels", None)):
        with pytest.raises(SystemExit, match=f"FLUX.2 generic: {k} is {v!r}, not a finite positive number"):
            families.check_rows([dict(row, **{k: v})])


def test_bench_arguments_are_checked_in_one_line():
    families = _families_bench()
    with pytest.raises(SystemExit, match="--families takes some of flux1,flux2,zimage; got sd3"):
        families.main(["--families", "sd3"])
    with pytest.raises(SystemExit, match="--repeats and --rounds >= 1; got 1, 3 and 0"):
        families.main(["--rounds", "0"])


def test_a_model_of_another_family_is_not_measured_as_this_one(comfy, monkeypatch):
    """ComfyUI builds each model from its weights; a model it took for another family stops the bench."""
    families = _families_bench()
    real = families.build_model
    monkeypatch.setattr(families, "build_model", lambda family, size: real("flux1", size))
    args = families.argparse.Namespace(r1=4, r2=1, preset="all")
    with pytest.raises(RuntimeError, match="the FLUX.2 model was not recognised as FLUX.2: None"):
        families.FamilyBench("flux2", families.SIZES["smoke"], args)
    monkeypatch.setattr(families, "build_model", lambda family, size: real("zimage", size))
    with pytest.raises(RuntimeError, match="the FLUX.2 model was not recognised as FLUX.2: ZImageDims"):
        families.FamilyBench("flux2", families.SIZES["smoke"], args)
