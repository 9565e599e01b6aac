"""Nothing lost, every failure a clear line: output checks before work, no surprise overwrites,
one top-level handler, atomic writes that clean up (SIGINT, SIGTERM, SIGKILL), umask modes,
refusals of misuse, deterministic files and one content hash."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from metalora_core.cli import main
from metalora_core.cli.errors import run_command
from metalora_core.cli.progress import StepLog
from metalora_core.faces import load_image
from metalora_core.formats.files import (atomic_save_png, atomic_save_safetensors, atomic_write_bytes,
                                         content_sha256, file_content_sha256, read_safetensors,
                                         remove_stale_temps)
from metalora_core.formats.lora import load_lora
from metalora_core.formats.outputs import check_output_file
from metalora_core.formats.prior import PRIOR_FORMAT, load_prior, make_prior, save_prior
from metalora_core.hosts.tiny import build_tiny_flux_pipeline
from metalora_core.lora.layers import FluxDims
from sample_photos import sample_photo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """A saved tiny diffusers FLUX folder and a fitting r1=4 prior file."""
    root = tmp_path_factory.mktemp("robust")
    pipe = build_tiny_flux_pipeline(seed=0)
    model = root / "flux"
    pipe.save_pretrained(str(model))
    dims = FluxDims.from_diffusers_config(pipe.transformer.config)
    prior = save_prior(make_prior(dims, r1=4, preset="attn", generator=torch.Generator().manual_seed(0)),
                       root / "prior.safetensors")
    return model, prior, dims


def personalize_args(flux, out, *extra: str, steps: str = "2") -> list[str]:
    model, prior, _ = flux
    return ["personalize", "--model", str(model), "--prior", str(prior), "--image", str(sample_photo("obama")),
            "--out", str(out), "--steps", steps, "--resolution", "64", "--dtype", "float32", "--device", "cpu",
            "--class-noun", "man", *extra]


def one_error_line(err: str, *needles: str) -> str:
    """The command printed exactly one line, an ``error:`` line holding every needle."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and ": error: " in lines[0], err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*.tmp")]


# ------------------------------------------------------------------ 1. outputs checked before work


@pytest.mark.parametrize("case", ["under_file", "directory", "long_name"])
def test_bad_out_fails_at_once_before_training(flux, tmp_path, capsys, caplog, case):
    blocker = tmp_path / "plain_file"
    blocker.write_text("x")
    out = {"under_file": blocker / "lora.safetensors", "directory": tmp_path,
           "long_name": tmp_path / ("n" * 300 + ".safetensors")}[case]
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO):
        assert main(personalize_args(flux, out, steps="2")) == 2
    elapsed = time.perf_counter() - t0
    assert "step 1/2" not in caplog.text, "it trained before checking --out"
    line = one_error_line(capsys.readouterr().err, "metalora personalize: error: --out")
    assert {"under_file": "is a file, not a folder", "directory": "is a folder; give a file name",
            "long_name": "choose a shorter name"}[case] in line
    assert elapsed < 1.0, f"took {elapsed:.2f} s: the check ran after expensive work"
    assert blocker.read_text() == "x"


def test_bad_state_fails_before_training_and_writes_nothing(flux, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    assert main(personalize_args(flux, out, "--state", str(tmp_path))) == 2
    one_error_line(capsys.readouterr().err, "--state", "is a folder")
    assert not out.exists()


def test_read_only_file_system_is_refused(flux, capsys):
    ro = Path("/proc/sys")  # read-only for every user, root included, wherever /proc is mounted
    if not ro.is_dir():
        pytest.skip("no /proc/sys here")
    assert main(personalize_args(flux, ro / "lora.safetensors")) == 2
    one_error_line(capsys.readouterr().err, "cannot write in /proc/sys")


def test_free_space_is_checked_when_the_size_is_known(tmp_path):
    with pytest.raises(ValueError, match=r"MiB free in .*the output needs about .*free some space"):
        check_output_file(tmp_path / "big.safetensors", expected_bytes=1 << 62)
    assert check_output_file(tmp_path / "small.safetensors", expected_bytes=1 << 10) == tmp_path / "small.safetensors"


# ------------------------------------------------------------------ 2. no silent overwrites


def test_personalize_refuses_existing_out_and_own_inputs(flux, tmp_path, capsys):
    _, prior, _ = flux
    existing = tmp_path / "lora.safetensors"
    existing.write_bytes(b"keep me")
    assert main(personalize_args(flux, existing)) == 2
    one_error_line(capsys.readouterr().err, f"--out {existing} already exists; pass --overwrite")
    assert existing.read_bytes() == b"keep me"
    before = prior.read_bytes()
    assert main(personalize_args(flux, prior, "--overwrite")) == 2  # refused even with --overwrite
    one_error_line(capsys.readouterr().err, "is also the --prior input")
    assert prior.read_bytes() == before
    photo = tmp_path / "me.jpg"
    photo.write_bytes(sample_photo("obama").read_bytes())
    args = personalize_args(flux, photo, "--overwrite")
    args[args.index("--image") + 1] = str(photo)
    assert main(args) == 2
    one_error_line(capsys.readouterr().err, "is also the --image input")
    same = tmp_path / "both.safetensors"
    assert main(personalize_args(flux, same, "--state", str(same))) == 2
    one_error_line(capsys.readouterr().err, "--out and --state are the same file")


def test_personalize_overwrite_replaces_and_hashes_agree(flux, tmp_path, capsys):
    """With --overwrite the old file is replaced; the LoRA names its prior by the one content hash."""
    _, prior, _ = flux
    out = tmp_path / "lora.safetensors"
    out.write_bytes(b"old")
    assert main(personalize_args(flux, out, "--overwrite", "--rank", "2", steps="2")) == 0
    _, meta = load_lora(out)
    capsys.readouterr()
    assert main(["inspect", str(prior)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert meta["prior_sha256"] == info["content_sha256"] == load_prior(prior).sha256 == file_content_sha256(prior)
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_meta_train_refuses_a_used_folder(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "checkpoint.safetensors"
    ckpt.write_bytes(b"600-step checkpoint")
    assert main(["meta-train", "--tiny", "--out", str(out), "--steps", "150"]) == 2
    one_error_line(capsys.readouterr().err, "already holds a meta-train run (checkpoint.safetensors)",
                   "--resume", "--overwrite")
    assert ckpt.read_bytes() == b"600-step checkpoint"
    assert main(["meta-train", "--tiny", "--out", str(tmp_path / "fresh"), "--resume"]) == 2
    one_error_line(capsys.readouterr().err, "--resume: no checkpoint at")


def test_crops_into_a_used_folder_refuses_or_clears_only_its_own(tmp_path, capsys, caplog):
    out = tmp_path / "crops"
    photo = str(sample_photo("obama"))
    assert main(["crops", photo, "--out", str(out), "--detector", "yunet"]) == 0
    first = json.loads((out / "crops.json").read_text())
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["crops", photo, "--out", str(out), "--detector", "yunet", "--seed", "1"]) == 2
    one_error_line(capsys.readouterr().err, f"--out {out} already holds the outputs of an earlier crops run",
                   f"{len(first['crops'])} crop PNG(s)", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    stray = out / "crop_98_1x1_s9.png"  # a crop of an earlier run under another grid
    stray.write_bytes(next(iter(before.values())))
    (out / "notes.txt").write_text("mine")
    with caplog.at_level(logging.INFO):
        assert main(["crops", photo, "--out", str(out), "--detector", "yunet", "--seed", "1", "--overwrite"]) == 0
    new = json.loads((out / "crops.json").read_text())
    assert not stray.exists() and "crop_98_1x1_s9.png" in caplog.text
    assert (out / "notes.txt").read_text() == "mine"  # not ours: untouched
    listed = {c["file"] for c in new["crops"]}
    crops_on_disk = {p.name for p in out.glob("crop_*.png")}
    assert crops_on_disk == listed, "crops.json lists exactly the crops in the folder"


# ------------------------------------------------------------------ 3. one error line, exit 2


def _broken_models(tmp_path: Path, flux) -> dict[str, Path]:
    import shutil

    model = flux[0]
    junk = tmp_path / "junk"
    shutil.copytree(model, junk)
    (junk / "model_index.json").write_text("{not json")
    bare = tmp_path / "bare"
    shutil.copytree(model, bare)
    shutil.rmtree(bare / "transformer")
    return {"junk": junk, "bare": bare}


def test_model_problems_are_one_error_line(flux, tmp_path, capsys):
    models = _broken_models(tmp_path, flux)
    out = tmp_path / "lora.safetensors"
    cases = []
    args = personalize_args(flux, out)
    args[args.index("--model") + 1] = str(models["junk"])
    cases.append((args, ["model_index.json is not valid JSON", "re-download"]))
    args = personalize_args(flux, out)
    args[args.index("--model") + 1] = str(models["bare"])
    cases.append((args, ["has no transformer/config.json", "download the whole FLUX folder"]))
    sd = tmp_path / "sd_unet.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2, 2)}, str(sd))
    cases.append((personalize_args(flux, out, "--transformer", str(sd)), ["is not a FLUX transformer"]))
    pickled = tmp_path / "model.ckpt"
    torch.save({"transformer_blocks.0.x": torch.zeros(1)}, pickled)
    cases.append((personalize_args(flux, out, "--transformer", str(pickled)), ["is a pickle", "convert it to .safetensors"]))
    cases.append((personalize_args(flux, out, "--transformer", str(tmp_path / "missing.safetensors")),
                  ["--transformer", "missing.safetensors: no such file"]))
    if not torch.cuda.is_available():
        args = personalize_args(flux, out)
        args[args.index("--device") + 1] = "cuda"
        cases.append((args, ["--device cuda:", "pass --device cpu"]))
    for args, needles in cases:
        assert main(args) == 2, needles
        one_error_line(capsys.readouterr().err, *needles)
    assert not out.exists()


def test_debug_flag_shows_the_traceback(flux, tmp_path, capsys):
    models = _broken_models(tmp_path, flux)
    args = personalize_args(flux, tmp_path / "l.safetensors", "--debug")
    args[args.index("--model") + 1] = str(models["junk"])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("metalora personalize: error:")


def test_a_real_bug_keeps_its_traceback_and_exit_1(capsys):
    import argparse

    def broken(args):
        return [][1]

    assert run_command(argparse.Namespace(command="x", func=broken)) == (1, None)
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error (IndexError" in err and "this is a bug" in err


def test_inspect_reports_bad_tensors_family_and_hash(tmp_path, capsys):
    zero_d = tmp_path / "zero_d.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.tensor(1.0),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(4, 1)}, str(zero_d))
    assert main(["inspect", str(zero_d)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "lora" and info["family"] == "flux"
    assert any("has shape (); a LoRA down/A matrix must be 2-D" in p for p in info["problems"])
    nan = tmp_path / "nan.safetensors"
    t = torch.zeros(2, 8)
    t[0, 0] = float("nan")
    t[1, 1] = float("inf")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": t,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}, str(nan))
    assert main(["inspect", str(nan)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"].startswith("stable-diffusion")
    assert info["nonfinite"] == {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": {"nan": 1, "inf": 1}}
    assert any("NaN or inf" in p for p in info["problems"]) and any("not FLUX" in p for p in info["problems"])
    assert info["content_sha256"] == file_content_sha256(nan)
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    one_error_line(capsys.readouterr().err, "no file at")


def test_prior_metadata_errors_name_the_file(flux, tmp_path):
    _, prior, _ = flux
    tensors, meta = read_safetensors(prior)
    bad = tmp_path / "bad_r1.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "r1": "four"})
    with pytest.raises(ValueError, match=rf"{bad}: metadata r1='four' is not a whole number"):
        load_prior(bad)
    bad_training = tmp_path / "bad_training.safetensors"
    save_file(tensors, str(bad_training), metadata={**meta, "training": "{oops"})
    with pytest.raises(ValueError, match=rf"{bad_training}: metadata 'training' is not valid JSON"):
        load_prior(bad_training)


# ------------------------------------------------------------------ 3/4. signals, real processes

_SLOW_WRITER = r"""
import sys, time
from metalora_core.formats.files import atomic_target
target = sys.argv[1]
with atomic_target(target) as tmp:
    with open(tmp, "wb") as f:
        block = b"\0" * (1 << 20)
        for i in range(4096):          # up to 4 GiB: a write that is still going when the signal comes
            f.write(block)
            f.flush()
            if i == 8:
                print("writing", flush=True)
            time.sleep(0.01)
"""


def _start_writer(target: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    return proc


def test_sigterm_during_a_write_leaves_no_temp_file(tmp_path):
    target = tmp_path / "big.safetensors"
    target.write_bytes(b"previous version")
    proc = _start_writer(target)
    temps = list(tmp_path.glob(".big.safetensors.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size >= 8 << 20
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM  # still dies of SIGTERM, as without the clean-up
    assert no_temp_files(tmp_path), list(tmp_path.iterdir())
    assert target.read_bytes() == b"previous version"


def test_sigkill_leftover_is_removed_at_the_next_write(tmp_path):
    target = tmp_path / "big.safetensors"
    proc = _start_writer(target)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    left = list(tmp_path.glob(".big.safetensors.*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size >= 8 << 20, "SIGKILL cannot be caught: a temp file remains"
    live = tmp_path / f".big.safetensors.{os.getpid()}-0123abcd.tmp"  # a live writer's temp file
    live.write_bytes(b"in progress")
    other = tmp_path / ".unrelated.safetensors.1-0123abcd.tmp"
    other.write_bytes(b"not beside this target")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and not left[0].exists()
    assert live.exists() and other.exists()


def test_resume_removes_a_killed_runs_temp_file(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = out / f".checkpoint.safetensors.{proc.pid}-deadbeef.tmp"  # pid of a finished process
    dead.write_bytes(b"\0" * 1024)
    (out / "checkpoint.safetensors").write_bytes(b"not a checkpoint")
    assert main(["meta-train", "--tiny", "--out", str(out), "--resume", "--data", str(tmp_path / "none")]) == 2
    capsys.readouterr()
    assert not dead.exists()
    assert remove_stale_temps(out / "checkpoint.safetensors") == []


def test_ctrl_c_in_meta_train_is_one_line_exit_130_nothing_half_written(tmp_path):
    from sample_photos import identity_folders

    out, data = tmp_path / "run", identity_folders(tmp_path / "identities")
    # PYTHONFAULTHANDLER: a run that does not stop is aborted below and prints where each thread was
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    # preexec_fn: Ctrl-C as in a terminal, also when these tests run as a background job (where a
    # shell starts every child with SIGINT ignored, and Python then leaves it ignored)
    proc = subprocess.Popen([sys.executable, "-m", "metalora_core", "meta-train", "--tiny", "--data", str(data),
                             "--out", str(out),
                             "--steps", "100000", "--bucket-steps", "50", "--warmup-steps", "2",
                             "--checkpoint-every", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.safetensors").is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        pytest.fail("meta-train did not stop within 120 s of Ctrl-C; where it was:\n"
                    + "\n".join(ln for ln in err.splitlines() if not ln.startswith("meta-train "))[-8000:])
    assert proc.returncode == 130, err
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("metalora meta-train: interrupted (Ctrl-C)") and "--resume" in last
    assert "Traceback" not in err
    assert no_temp_files(out)
    from metalora_core.formats.files import read_safetensors as rs

    _, meta = rs(out / "checkpoint.safetensors")  # the last checkpoint is whole
    assert meta["format"] == "metalora.metatrain-checkpoint"


# ------------------------------------------------------------------ 5. umask modes


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_get_the_umask_mode(tmp_path, mask):
    old = os.umask(mask)
    try:
        a = atomic_save_safetensors({"x": torch.ones(2)}, tmp_path / "a.safetensors", {"k": "v"})
        b = atomic_save_png(Image.new("RGB", (4, 4)), tmp_path / "b.png")
        c = atomic_write_bytes(tmp_path / "c.json", b"{}")
    finally:
        os.umask(old)
    for p in (a, b, c):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, (p, oct(p.stat().st_mode))


# ------------------------------------------------------------------ 6. misuse refused or reported


def test_integer_and_nonfinite_priors_are_refused(flux, tmp_path, capsys):
    _, prior, _ = flux
    tensors, meta = read_safetensors(prior)
    int8 = tmp_path / "int8.safetensors"
    save_file({k: (v * 100).to(torch.int8) for k, v in tensors.items()}, str(int8), metadata=meta)
    with pytest.raises(ValueError, match=rf"{int8}: tensor .* is int8, not floating point"):
        load_prior(int8)
    args = personalize_args(flux, tmp_path / "l.safetensors")
    args[args.index("--prior") + 1] = str(int8)
    assert main(args) == 2
    one_error_line(capsys.readouterr().err, "int8, not floating point")
    nan = tmp_path / "nan.safetensors"
    first = sorted(tensors)[0]
    bad = {k: v.clone() for k, v in tensors.items()}
    bad[first][0, 0] = float("nan")
    save_file(bad, str(nan), metadata=meta)
    args[args.index("--prior") + 1] = str(nan)
    assert main(args) == 2  # refused before training, naming the file and the layer
    one_error_line(capsys.readouterr().err, f"--prior {nan}: layer '{first[:-len('.meta_down')]}' holds NaN or inf")
    lora_int = tmp_path / "lora_int.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(2, 3, dtype=torch.int32)},
              str(lora_int))
    with pytest.raises(ValueError, match="int32, not floating point"):
        load_prior(lora_int)
    assert meta["format"] == PRIOR_FORMAT


def test_rank_above_r1_and_nonfinite_flags_are_blamed_on_the_flag(flux, tmp_path, capsys):
    out = tmp_path / "l.safetensors"
    assert main(personalize_args(flux, out, "--rank", "5")) == 2
    one_error_line(capsys.readouterr().err, "--rank 5 is above the prior's r1 = 4", "set --rank to 4 or less")
    assert main(personalize_args(flux, out, "--guidance", "nan")) == 2
    one_error_line(capsys.readouterr().err, "--guidance nan is not a finite number")
    assert main(personalize_args(flux, out, "--lr", "inf")) == 2
    one_error_line(capsys.readouterr().err, "--lr inf is not a finite number")
    assert not out.exists()


def test_malformed_or_foreign_lora_as_prior_is_one_error_line(flux, tmp_path, capsys):
    zero_d = tmp_path / "zero_d.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.tensor(1.0),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(4, 1)}, str(zero_d))
    args = personalize_args(flux, tmp_path / "l.safetensors")
    args[args.index("--prior") + 1] = str(zero_d)
    assert main(args) == 2  # not an IndexError traceback, exit 1
    one_error_line(capsys.readouterr().err, f"{zero_d}: tensor 'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' "
                                            "has shape (); a LoRA down/A matrix must be 2-D")
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}, str(sdxl))
    with pytest.raises(ValueError, match=r"a LoRA for stable-diffusion \(unet: SD1.x / SD2 / SDXL\), not FLUX"):
        load_prior(sdxl)


@pytest.mark.parametrize("case", ["r1", "format_version", "training"])
def test_inspect_reports_what_load_prior_refuses(flux, tmp_path, capsys, case):
    _, prior, _ = flux
    tensors, meta = read_safetensors(prior)
    bad = tmp_path / f"bad_{case}.safetensors"
    save_file(tensors, str(bad), metadata={**meta, **{"r1": {"r1": "four"}, "format_version": {"format_version": "x"},
                                                       "training": {"training": "{oops"}}[case]})
    with pytest.raises(ValueError) as refused:
        load_prior(bad)
    assert main(["inspect", str(bad)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["problems"] == [f"not usable as a prior: {str(refused.value).replace(str(bad), bad.name)}"]
    assert main(["inspect", str(prior)]) == 0
    assert json.loads(capsys.readouterr().out)["problems"] == []


def test_outputs_must_be_safetensors_and_resolution_errors_name_the_flag(flux, tmp_path, capsys):
    jpg = tmp_path / "lora.jpg"
    assert main(personalize_args(flux, jpg)) == 2
    one_error_line(capsys.readouterr().err, f"--out {jpg}: the file is written as safetensors, so its name must end "
                                            f"in .safetensors; e.g. {tmp_path / 'lora.safetensors'}")
    state = tmp_path / "state.bin"
    assert main(personalize_args(flux, tmp_path / "l.safetensors", "--state", str(state))) == 2
    one_error_line(capsys.readouterr().err, f"--state {state}: the file is written as safetensors")
    real_state = tmp_path / "s.safetensors"
    real_state.write_bytes(b"state")
    assert main(["export", str(real_state), "--out", str(jpg)]) == 2
    one_error_line(capsys.readouterr().err, f"--out {jpg}: the file is written as safetensors")
    args = personalize_args(flux, tmp_path / "l.safetensors")
    args[args.index("--resolution") + 1] = "8"
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err, "--resolution 8 is too small", "e.g. --resolution 512")
    assert "bucket_area" not in line
    assert main(["meta-train", "--tiny", "--resolution", "8", "--out", str(tmp_path / "mt")]) == 2
    one_error_line(capsys.readouterr().err, "--resolution 8 is too small")
    assert not jpg.exists() and not state.exists() and not (tmp_path / "mt").exists()


def test_a_crop_side_the_grid_cannot_cut_fails_before_flux_loads(flux, tmp_path, capsys, monkeypatch):
    from metalora_core.hosts import diffusers_flux

    monkeypatch.setattr(diffusers_flux, "load_flux_pipeline", lambda *a, **k: pytest.fail("FLUX loaded"))
    out = tmp_path / "l.safetensors"
    assert main(personalize_args(flux, out, "--resolution", "16")) == 2
    one_error_line(capsys.readouterr().err, "--resolution 16 is too small: a crop needs at least 32x32 pixels")
    assert main(["crops", str(sample_photo("obama")), "--out", str(tmp_path / "c"), "--resolution", "0"]) == 2
    one_error_line(capsys.readouterr().err, "--resolution 0 is too small")
    assert not out.exists() and not (tmp_path / "c").exists()


def test_prior_of_another_width_fails_before_training_naming_the_file(tmp_path, flux, capsys):
    _, _, dims = flux
    wide = FluxDims(hidden=dims.hidden * 2, mlp_hidden=dims.mlp_hidden * 2, num_double=dims.num_double,
                    num_single=dims.num_single)
    other = save_prior(make_prior(wide, r1=4, preset="attn", generator=torch.Generator().manual_seed(0)),
                       tmp_path / "wide.safetensors")
    args = personalize_args(flux, tmp_path / "l.safetensors")
    args[args.index("--prior") + 1] = str(other)
    assert main(args) == 2
    one_error_line(capsys.readouterr().err, f"--prior {other}: layer", "another model width or rank")


def test_animated_gif_says_only_the_first_frame_is_used(tmp_path, caplog):
    base = load_image(sample_photo("obama")).resize((64, 64))
    gif = tmp_path / "anim.gif"
    base.save(gif, save_all=True, append_images=[base.rotate(90), base.rotate(180)], duration=100)
    with caplog.at_level(logging.WARNING):
        im = load_image(gif)
    assert im.size == (64, 64)
    assert "anim.gif has 3 frames" in caplog.text and "only the first frame is used" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_image(sample_photo("obama"))
    assert "frames" not in caplog.text


def test_progress_is_logged_at_least_every_30_seconds(caplog):
    now = [0.0]
    log = logging.getLogger("metalora_core.test_progress")
    progress = StepLog(1_000_000, log, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger=log.name):
        for step in range(1, 11):
            now[0] += 31.0  # each step takes 31 s: far fewer than total // 20 steps per line
            progress(step, 0.5)
    assert len(caplog.records) == 10
    caplog.clear()
    fast = StepLog(1000, log, clock=lambda: 0.0)
    with caplog.at_level(logging.INFO, logger=log.name):
        for step in range(1, 1001):
            fast(step, 0.5)
    assert [r.args[0] for r in caplog.records] == [1] + list(range(50, 1001, 50))


# ------------------------------------------------------------------ 8. deterministic bytes, one hash


def test_equal_content_gives_equal_file_bytes(flux, tmp_path):
    _, _, dims = flux
    prior = make_prior(dims, r1=4, preset="attn", generator=torch.Generator().manual_seed(0), domain="woman")
    a, b = save_prior(prior, tmp_path / "a.safetensors"), save_prior(prior, tmp_path / "b.safetensors")
    assert a.read_bytes() == b.read_bytes()
    meta = {f"key{i}": str(i) for i in range(12)}
    x = atomic_save_safetensors({"t": torch.ones(3)}, tmp_path / "x.safetensors", meta)
    y = atomic_save_safetensors({"t": torch.ones(3)}, tmp_path / "y.safetensors", dict(reversed(meta.items())))
    assert x.read_bytes() == y.read_bytes()
    assert read_safetensors(x) [1] == meta


def test_one_content_hash_everywhere(flux, tmp_path):
    _, prior_path, dims = flux
    tensors, meta = read_safetensors(prior_path)
    prior = load_prior(prior_path)
    assert prior.sha256 == file_content_sha256(prior_path) == content_sha256(tensors, meta)
    made = make_prior(dims, r1=4, preset="attn", generator=torch.Generator().manual_seed(0))
    assert made.sha256 == prior.sha256, "a prior in memory has the hash of the file it saves as"
    # metadata is part of the identity: the same tensors under another domain label differ
    made.domain = "other"
    assert made.sha256 != prior.sha256


def test_sigterm_under_the_cli_handler_is_one_line_exit_143(tmp_path, capsys):
    import argparse

    from metalora_core.formats.files import atomic_target

    target = tmp_path / "out.safetensors"

    def writes_then_gets_sigterm(args):
        with atomic_target(target) as tmp:
            tmp.write_bytes(b"\0" * (1 << 20))
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered to this process
            time.sleep(5)

    before = signal.getsignal(signal.SIGTERM)
    assert run_command(argparse.Namespace(command="meta-train", func=writes_then_gets_sigterm)) == (143, None)
    err = capsys.readouterr().err.strip()
    assert err.startswith("metalora meta-train: terminated (SIGTERM)") and "\n" not in err and "--resume" in err
    assert not target.exists() and no_temp_files(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before, "the handler restores the previous SIGTERM action"


@pytest.mark.parametrize("command", ["meta-train", "crops", "demo", "eval"])
def test_folder_outputs_refuse_a_file_and_earlier_results(tmp_path, capsys, command):
    plain = tmp_path / "a_file"
    plain.write_text("x")
    base = {"meta-train": ["meta-train", "--tiny"], "crops": ["crops", str(sample_photo("obama"))],
            "demo": ["demo"],
            "eval": ["eval", "--identities", str(tmp_path), "--prompts", "unsplash", "--generated", str(tmp_path)]}
    assert main([*base[command], "--out", str(plain)]) == 2
    one_error_line(capsys.readouterr().err, f"--out {plain} is a file, not a folder")
    used = tmp_path / "used"
    used.mkdir()
    earlier = {"meta-train": "prior.safetensors", "crops": "crops.json", "demo": "report.json",
               "eval": "summary.json"}[command]
    (used / earlier).write_text("earlier result")
    assert main([*base[command], "--out", str(used)]) == 2
    one_error_line(capsys.readouterr().err, f"--out {used} already holds", earlier, "--overwrite")
    assert (used / earlier).read_text() == "earlier result"


def test_export_refuses_existing_out_and_its_own_state(tmp_path, capsys):
    state = tmp_path / "state.safetensors"
    state.write_bytes(b"state")
    existing = tmp_path / "lora.safetensors"
    existing.write_bytes(b"keep")
    assert main(["export", str(state), "--out", str(existing)]) == 2
    one_error_line(capsys.readouterr().err, "already exists; pass --overwrite")
    assert main(["export", str(state), "--out", str(state), "--overwrite"]) == 2
    one_error_line(capsys.readouterr().err, "is also the state input")
    assert existing.read_bytes() == b"keep" and state.read_bytes() == b"state"


def test_library_conditioning_blames_nonfinite_guidance():
    from metalora_core.hosts.diffusers_flux import FluxTextCond

    with pytest.raises(ValueError, match="guidance nan is not a finite number"):
        FluxTextCond(torch.zeros(1, 4, 8), torch.zeros(1, 8), torch.zeros(4, 3), guidance=float("nan"))
    assert FluxTextCond(torch.zeros(1, 4, 8), torch.zeros(1, 8), torch.zeros(4, 3), guidance=3.5).guidance == 3.5


def test_a_ctrl_c_that_python_drops_in_a_destructor_still_stops_the_next_step(capsys, monkeypatch):
    """Python ignores an exception raised inside ``__del__``: a Ctrl-C landing there must still stop
    the run at the next step callback (exit 130), not let it go on."""
    import argparse

    from metalora_core.cli.errors import run_command
    from metalora_core.cli.progress import StepLog

    dropped = []  # what Python hands to sys.unraisablehook instead of raising (pytest would print it)
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)

    class CtrlCInDestructor:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)  # the handler runs here; Python reports and drops its KeyboardInterrupt

    steps = []

    def train(args):
        log = StepLog(100, logging.getLogger("test"))
        CtrlCInDestructor()  # freed at once
        for step in range(1, 101):
            steps.append(step)
            log(step, 0.5)
        return "finished"

    outer = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (see above)
    try:
        code, result = run_command(argparse.Namespace(func=train, command="personalize"))
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, outer)
    assert (code, result) == (130, None) and steps == [1]
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    assert [type(u.exc_value) for u in dropped] == [KeyboardInterrupt]


def test_a_ctrl_c_that_is_ignored_stays_ignored():
    """A background job (SIGINT ignored) or a host with its own handler keeps it: the CLI installs
    its Ctrl-C handler only over Python's default one."""
    import argparse

    from metalora_core.cli.errors import run_command

    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        seen = []
        code, _ = run_command(argparse.Namespace(func=lambda a: seen.append(signal.getsignal(signal.SIGINT)),
                                                 command="personalize"))
        assert code == 0 and seen == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)
