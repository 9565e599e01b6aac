"""`metalora meta-train` data-parallel under torchrun (gloo on the CPU, 2 processes on loopback).

The torchrun runs go through the public entry point (``python -m torch.distributed.run ... -m
metalora_core meta-train``) and are compared with single-process runs of the same command on the
same global batch and seed: the prior, the checkpoint (whose format must not depend on the number
of processes), and a SIGKILL of the whole torchrun group resumed with another number of processes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from metalora_core.cli import main
from metalora_core.formats.files import read_safetensors
from metalora_core.train.distributed import LaunchEnv, from_env, launch_device, split_rows
from metalora_core.train.stage1 import check_world_size

REPO = Path(__file__).resolve().parents[1]
IDENTITIES = {"ann": (230, 190, 160), "bob": (120, 80, 50), "cid": (250, 220, 200), "dan": (180, 130, 90)}
STEPS = 24
KILL_AFTER = 8  # bucket visit 2 (steps 6..11), joint phase from step 8
TOL = 1e-5  # fp32: the ranks sum the same per-item gradients in another order
RUN_TIMEOUT_S = 240


def _make_dataset(root: Path) -> Path:
    """Four generated 'identities' in two aspect buckets (48x48 and 64x48): batches of 3 and of 2."""
    for name, colour in IDENTITIES.items():
        (root / name).mkdir(parents=True)
        for k in range(3):
            img = Image.new("RGB", (48, 48) if k < 2 else (64, 48), (40 + 30 * k, 60, 90))
            ImageDraw.Draw(img).ellipse([14 + 3 * k, 8, 34 + 3 * k, 40], fill=colour)
            img.save(root / name / f"{k}.png")
    return root


def _args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    # batch 3 on 2 processes: the global batch is split 2 + 1 (and the 2-item batches 1 + 1)
    return ["meta-train", "--tiny", "--data", str(data), "--out", str(out), "--no-augment", "--resolution", "32",
            "--steps", str(steps), "--bucket-steps", "6", "--warmup-steps", "2", "--identities-per-bucket", "2",
            "--r1", "2", "--batch-size", "3", "--lr", "2e-3", "--checkpoint-every", "2",
            "--cache", str(data.parent / "cache"), *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, argv: list[str]) -> subprocess.Popen:
    """Starts ``torchrun --nproc_per_node nproc -m metalora_core ...``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--rdzv-id", "metalora-test",
           "--max-restarts", "0", "-m", "metalora_core", *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (from /proc; torchrun starts each worker in its own session)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        here = todo.pop()
        kids = [c for c, p in parent.items() if p == here]
        found += kids
        todo += kids
    return found


def _kill_all(proc: subprocess.Popen) -> list[int]:
    """SIGKILL for the workers and then the launcher, as a crash of the machine's processes would."""
    workers = _descendants(proc.pid)
    for pid in [*workers, proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return workers


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_all(proc)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def _max_diff(a: Path, b: Path) -> float:
    ta, _ = read_safetensors(a)
    tb, _ = read_safetensors(b)
    assert ta.keys() == tb.keys()
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def _state(path: Path) -> dict:
    return json.loads(read_safetensors(path)[1]["state"])


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The dataset and an uninterrupted single-process run (no torchrun environment)."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = _make_dataset(tmp / "data")
    assert main(_args(data, tmp / "one", STEPS)) == 0
    return tmp, data, tmp / "one"


def test_torchrun_two_processes_match_one_process(ref):
    tmp, data, one = ref
    out = _finish(_torchrun(2, _args(data, tmp / "two", STEPS)))
    assert out.count("meta-train finished") == 1 and "ranks    2 processes (gloo)" in out  # rank 0 reports
    assert out.count("data-parallel on 2 processes") == 1  # log lines from rank 0 only
    assert out.count("batch size 3 is not a multiple of the 2 processes") == 1
    diff = _max_diff(one / "prior.safetensors", tmp / "two" / "prior.safetensors")
    print(f"max |prior Down 2 processes - 1 process| = {diff:.3g}")
    assert diff <= TOL
    # Checkpoints: the same tensors (the whole bank gathered onto rank 0) and the same schedule state.
    assert _max_diff(one / "checkpoint.safetensors", tmp / "two" / "checkpoint.safetensors") <= TOL
    a, b = _state(one / "checkpoint.safetensors"), _state(tmp / "two" / "checkpoint.safetensors")
    assert a["losses"] == pytest.approx(b["losses"], abs=TOL)
    assert {k: v for k, v in a.items() if k != "losses"} == {k: v for k, v in b.items() if k != "losses"}
    summary = json.loads((tmp / "two" / "summary.json").read_text())
    assert summary["data_parallel"] == {"world_size": 2, "backend": "gloo"} and summary["steps"] == STEPS


def test_torchrun_killed_then_resumed_in_one_process_matches(ref):
    tmp, data, one = ref
    out = tmp / "killed"
    checkpoint = out / "checkpoint.safetensors"
    proc = _torchrun(2, _args(data, out, STEPS))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    # Kill once a checkpoint from the second bucket's joint phase exists (the bank then holds every
    # identity, sharded over both ranks); checkpoints are renamed into place, so each read is whole.
    while proc.poll() is None and time.monotonic() < deadline:
        if checkpoint.is_file() and _state(checkpoint)["step"] >= KILL_AFTER:
            break
        time.sleep(0.02)
    workers = _kill_all(proc)  # both workers and the launcher, mid-run
    log, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL and len(workers) >= 2, log[-4000:]
    killed_at = _state(checkpoint)["step"]
    assert KILL_AFTER <= killed_at < STEPS and not (out / "prior.safetensors").exists()

    assert main(_args(data, out, STEPS, "--resume")) == 0  # one process continues the 2-process run
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["resumed_from"] < STEPS and summary["steps"] == STEPS and "data_parallel" not in summary
    diff = _max_diff(one / "prior.safetensors", out / "prior.safetensors")
    print(f"killed at checkpoint step {killed_at}, resumed at {summary['resumed_from']}: max diff {diff:.3g}")
    assert diff <= TOL


def test_one_process_checkpoint_resumes_under_torchrun(ref):
    tmp, data, one = ref
    out = tmp / "grow"
    assert main(_args(data, out, 11)) == 0  # stops mid-bucket (joint phase); --steps may grow on resume
    log = _finish(_torchrun(2, _args(data, out, STEPS, "--resume")))
    assert "resuming at step 11" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 11 and summary["steps"] == STEPS
    diff = _max_diff(one / "prior.safetensors", out / "prior.safetensors")
    print(f"1 process to step 11, 2 processes to {STEPS}: max diff {diff:.3g}")
    assert diff <= TOL


# -- bad launches: clear errors, no process group needed -------------------------------------


def test_batch_smaller_than_world_size_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    data = _make_dataset(tmp_path / "data")
    argv = _args(data, tmp_path / "out", 4)
    argv[argv.index("--batch-size") + 1] = "2"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--batch-size 2 is smaller than the number of processes (4)" in err and "raise --batch-size to 4" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--batch-size 1 .* processes \\(2\\)"):
        check_world_size(1, 2)
    check_world_size(3, 2)  # uneven splits are fine


def test_launch_environment_is_read_strictly():
    assert from_env({}) is None  # a plain single-process run
    assert from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None  # one process: the same
    env = from_env({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"})
    assert (env.world_size, env.rank, env.local_rank, env.is_root) == (8, 5, 1, False)
    with pytest.raises(ValueError, match="sets WORLD_SIZE but not RANK, LOCAL_RANK"):
        from_env({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        from_env({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="RANK=2 does not fit WORLD_SIZE=2"):
        from_env({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"})
    launch = LaunchEnv(world_size=2, rank=1, local_rank=1)
    assert launch_device(launch, "cpu") == "cpu"
    with pytest.raises(ValueError, match="--device 'cuda:1' cannot be used under torchrun.*cuda:LOCAL_RANK"):
        launch_device(launch, "cuda:1")


def test_split_rows_covers_the_batch_once():
    for n in range(1, 10):
        for world in range(1, 5):
            parts = [split_rows(n, world, r) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert split_rows(3, 2, 0) == [0, 1] and split_rows(3, 2, 1) == [2] and split_rows(1, 2, 1) == []
