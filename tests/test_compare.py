"""The powered comparison on the gated assay (experiments/compare.py): paired contrasts, reach,
verdict, resumability, and its refusal to run on an assay whose gates failed."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from metalora_core.synthfaces.compare import analyse, verdict
from references import load_script

def _script(name: str):
    return load_script(f"experiments/{name}.py")


def _runs(effect: float, n: int = 6) -> list[dict]:
    g = np.random.default_rng(0)
    runs = []
    for k in range(n):
        base = float(g.normal(0.4, 0.1))
        for m, add in (("lora", -0.05), ("lora_aug", 0.0), ("meta_lora", effect)):
            runs.append({"set": k % 2, "k": k, "seed": k * 10, "method": m,
                         "scores": {s: {"identity": base + add * (int(s) / 200) + float(g.normal(0, 0.002)),
                                        "prompt": 1.0, "flow": 0.3 - add} for s in ("100", "200")}})
        runs.append({"set": k % 2, "k": k, "seed": k * 10, "method": "base",
                     "scores": {"0": {"identity": 0.1, "prompt": 1.0, "flow": 0.4}}})
    return runs


def test_contrasts_are_paired_and_the_verdict_follows_the_ci():
    up = analyse(_runs(0.1), (100, 200), ("lora", "lora_aug", "meta_lora"))
    c = up["contrasts"]["meta_lora - lora_aug"]["identity"]["200"]
    assert c["n"] == 6 and c["mean"] == pytest.approx(0.1, abs=0.01) and c["ci95"][0] > 0
    assert up["contrasts"]["meta_lora - lora"]["identity"]["200"]["mean"] == pytest.approx(0.15, abs=0.01)
    assert up["contrasts"]["meta_lora - lora_aug"]["flow"]["200"]["mean"] == pytest.approx(-0.1)
    assert "the prior (Meta-LoRA vs LoRA + augmentation, same crops): higher identity score" in up["verdict"]
    assert up["reach"]["methods"]["meta_lora"]["reaching"] == 6 and up["reach"]["methods"]["meta_lora"]["by_step"]["100"] == 6
    down = analyse(_runs(-0.1), (100, 200), ("lora", "lora_aug", "meta_lora"))
    assert "lower identity score" in down["verdict"]
    null = analyse(_runs(0.0), (100, 200), ("lora", "lora_aug", "meta_lora"))
    assert "no difference detectable" in verdict(null["contrasts"], "200").split(";")[0]
    assert null["pairs"] == 6 and null["ablations"] == {}


def test_smoke_comparison_writes_its_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _script("compare").main(["--out", str(out), "--smoke"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["contrasts"]) == {"meta_lora - lora_aug", "meta_lora - lora"}
    assert set(res["ablations"]) >= {"random_down - lora_aug", "pca_down - lora_aug"}
    assert res["contrasts"]["meta_lora - lora_aug"]["identity"]["2"]["n"] == 2 == res["pairs"]
    assert set(res["gates"]) == {"latent", "judge", "base", "positive_control", "stage1_signal"}
    runs = (out / "runs.jsonl").read_text().splitlines()
    assert len(runs) == 2 * 6  # 2 pairs x (base + 5 methods)
    for f in ("table.md", "figure.png", "contrasts.png"):
        assert (out / f).is_file()
    assert np.unique(np.asarray(Image.open(out / "contrasts.png").convert("L"))).size > 2
    # a rerun finds every run done and trains nothing; --threads sets torch's thread count
    capsys.readouterr()
    threads = torch.get_num_threads()
    try:
        assert _script("compare").main(["--out", str(out), "--smoke", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert (out / "runs.jsonl").read_text().splitlines() == runs
    # the full comparison refuses an assay whose gates failed (the smoke build's), with one line
    rc = _script("compare").main(["--out", str(tmp_path / "full"), "--assay", str(out / "assay")])
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 3 and "FAILED" in printed[-1] and "no comparison is run" in printed[-1]


def test_two_shards_share_the_runs_and_equal_one_process(tmp_path, capsys):
    """Two --shard runs split the pairs between them in one runs.jsonl, write no results, and a run
    without --shard then trains nothing: the same rows (Stage-2 timings aside) as one process."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _script("compare").main(["--out", str(whole), "--smoke"]) == 0
    units = lambda: {(json.loads(line)["set"], json.loads(line)["seed"])  # noqa: E731
                     for line in (split / "runs.jsonl").read_text().splitlines()}
    for i in (0, 1):
        assert _script("compare").main(["--out", str(split), "--smoke", "--shard", f"{i}/2"]) == 0
        assert "shard %d/2 done" % i in capsys.readouterr().out
        assert not (split / "results.json").exists()
        assert len(units()) == i + 1  # each shard ran its own pair only
    rows = lambda p: sorted(json.dumps({k: v for k, v in json.loads(line).items() if k != "stage2_seconds"},  # noqa: E731
                                       sort_keys=True) for line in (p / "runs.jsonl").read_text().splitlines())
    before = rows(split)
    assert _script("compare").main(["--out", str(split), "--smoke"]) == 0
    assert rows(split) == before == rows(whole)
    assert json.loads((split / "results.json").read_text())["contrasts"] == \
        json.loads((whole / "results.json").read_text())["contrasts"]
    with pytest.raises(SystemExit):
        _script("compare").main(["--out", str(split), "--smoke", "--shard", "2/2"])
    assert "--shard '2/2'" in capsys.readouterr().err


def test_committed_comparison_is_what_its_runs_give_and_the_docs_quote_it():
    """experiments/results_gated is what compare.py wrote from its runs.jsonl on the committed,
    gated assay: re-analysing the runs gives the committed contrasts, ablations, reach and verdict;
    every gate passed; both contrasts have n >= 32 at every checkpoint; and both READMEs quote the
    verdict's numbers."""
    from references import REPO as ROOT

    from metalora_core.synthfaces.assay import config_from_dict
    from metalora_core.synthfaces.compare import ABLATIONS, MAIN

    folder, assay = ROOT / "experiments" / "results_gated", ROOT / "experiments" / "assay"
    res = json.loads((folder / "results.json").read_text())
    runs = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines() if line.strip()]
    again = json.loads(json.dumps(analyse(runs, res["checkpoints"], MAIN + ABLATIONS)))
    for key in ("contrasts", "ablations", "reach", "verdict", "methods", "base_model", "pairs"):
        assert again[key] == res[key], key
    gates = json.loads((assay / "gates.json").read_text())
    assert res["gates"] == gates and all(g["passed"] for g in gates.values()) and len(gates) == 5
    config = config_from_dict(json.loads((assay / "assay_config.json").read_text()))
    assert res["checkpoints"] == list(config.checkpoints) and res["rank"] == config.rank
    assert res["lr"] == json.loads((assay / "positive_control.json").read_text())["chosen_lr"]
    for group in ("contrasts", "ablations"):
        for c in res[group].values():
            assert all(v["n"] >= 32 for v in c["identity"].values())
    assert len(res["ablations"]) == 4 and res["pairs"] >= 32
    last = str(res["checkpoints"][-1])
    for doc in ("README.md", "experiments/README.md"):
        text = (ROOT / doc).read_text()
        for name in ("meta_lora - lora_aug", "meta_lora - lora"):
            c = res["contrasts"][name]["identity"][last]
            quoted = f"{c['mean']:+.3f} (95 % CI {c['ci95'][0]:+.3f} to {c['ci95'][1]:+.3f}, n = {c['n']})"
            assert quoted in text, (doc, quoted)
