"""`metalora download` / download_prior against a Hub-compatible server on loopback.

The real huggingface_hub client talks HTTP to :class:`hub_server.LoopbackHub` through
``HF_ENDPOINT``; nothing reaches the internet.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_bytes

from hub_server import LoopbackHub
from metalora_core.cli import main
from metalora_core.formats.hub import HubFile, download_prior
from metalora_core.formats.prior import load_prior, make_prior, save_prior
from metalora_core.lora.layers import FluxDims

DIMS = FluxDims(hidden=64, mlp_hidden=256, num_double=1, num_single=1)


@pytest.fixture()
def prior_bytes(tmp_path) -> bytes:
    prior = make_prior(DIMS, r1=4, preset="attn", generator=torch.Generator().manual_seed(0), domain="test")
    return save_prior(prior, tmp_path / "src.safetensors").read_bytes()


def _lora_bytes() -> bytes:
    g = torch.Generator().manual_seed(1)
    t = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 64, generator=g),
         "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 2)}
    return save_bytes(t)


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no token file or cache of the user's
    for k in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    with LoopbackHub() as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_download_places_a_checked_prior_with_its_provenance(hub, prior_bytes, tmp_path, caplog):
    repo = hub.add("authors/meta-lora", {"priors/meta_down.safetensors": prior_bytes})
    dest = tmp_path / "models" / "meta_lora"
    with caplog.at_level("INFO", logger="metalora_core.formats.hub"):
        got = download_prior(HubFile("authors/meta-lora", "priors/meta_down.safetensors"), dest)
    assert got.path == dest / "meta_down.safetensors" and not got.reused
    assert _leftovers(dest) == ["meta_down.safetensors"]  # no temp folder, no .incomplete
    sha = hashlib.sha256(prior_bytes).hexdigest()
    commit = repo.commits["main"]
    assert got.provenance == {"source_repo": "authors/meta-lora", "source_filename": "priors/meta_down.safetensors",
                              "source_revision": "main", "source_commit": commit, "source_sha256": sha,
                              "source_url": f"{hub.url}/authors/meta-lora/resolve/{commit}/priors/meta_down.safetensors"}
    loaded = load_prior(got.path)  # what the Prior Loader node reads later
    assert loaded.provenance == got.provenance and loaded.r1 == 4 and loaded.domain == "test"
    src = load_prior_bytes(prior_bytes, tmp_path)
    assert all(torch.equal(loaded.downs[k], src.downs[k]) for k in src.downs)
    assert commit[:12] in caplog.text and sha[:12] in caplog.text
    # the file was fetched pinned to the commit the revision resolved to
    assert any(m == "GET" and f"/resolve/{commit}/" in p for m, p, _ in hub.requests)

    # asked again: same commit on the Hub -> kept, not downloaded again
    n = hub.gets("meta_down.safetensors")
    again = download_prior(HubFile("authors/meta-lora", "priors/meta_down.safetensors"), dest)
    assert again.reused and hub.gets("meta_down.safetensors") == n


def load_prior_bytes(data: bytes, tmp_path: Path):
    p = tmp_path / "ref.safetensors"
    p.write_bytes(data)
    return load_prior(p)


def test_a_lora_usable_as_a_prior_is_accepted(hub, tmp_path):
    hub.add("someone/flux-lora", {"lora.safetensors": _lora_bytes()})
    got = download_prior(HubFile("someone/flux-lora", "lora.safetensors"), tmp_path)
    assert got.prior.source == "peft" and got.prior.r1 == 2
    assert list(got.prior.downs) == ["transformer_blocks.0.attn.to_q"]


def test_missing_file_is_a_404_naming_the_file(hub, prior_bytes, tmp_path):
    hub.add("authors/meta-lora", {"prior.safetensors": prior_bytes})
    with pytest.raises(FileNotFoundError, match="no such file at this revision"):
        download_prior(HubFile("authors/meta-lora", "typo.safetensors"), tmp_path / "d")
    with pytest.raises(ValueError, match="revision 'v9' does not exist"):
        download_prior(HubFile("authors/meta-lora", "prior.safetensors", "v9"), tmp_path / "d")
    with pytest.raises(ValueError, match="not found, or private .*HF_TOKEN"):
        download_prior(HubFile("nobody/nothing", "prior.safetensors"), tmp_path / "d")
    assert _leftovers(tmp_path / "d") == []


def test_private_repo_uses_hf_token(hub, prior_bytes, tmp_path, monkeypatch):
    hub.add("me/private", {"p.safetensors": prior_bytes}, token="hf_secret")
    with pytest.raises(ValueError, match="HF_TOKEN"):
        download_prior(HubFile("me/private", "p.safetensors"), tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert download_prior(HubFile("me/private", "p.safetensors"), tmp_path).path.is_file()


@pytest.mark.parametrize("case", ["not_safetensors", "not_a_prior", "bytes_changed", "nan"])
def test_a_corrupt_file_leaves_nothing(hub, prior_bytes, tmp_path, case):
    data = {"not_safetensors": b"<html>proxy login page</html>" * 10,
            "not_a_prior": save_bytes({"some.weight": torch.ones(3, 3)}),
            "bytes_changed": prior_bytes,
            "nan": save_bytes({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.full((2, 64), float("nan"))}),
            }[case]
    hub.add("authors/meta-lora", {"p.safetensors": data}, modes={"p.safetensors": "corrupt"} if case == "bytes_changed" else None)
    dest = tmp_path / "meta_lora"
    expected = {"not_safetensors": "not a usable prior", "not_a_prior": "not a usable prior",
                "bytes_changed": "sha256 .* the transfer was corrupted", "nan": "NaN or inf"}[case]
    with pytest.raises(ValueError, match=expected):
        download_prior(HubFile("authors/meta-lora", "p.safetensors"), dest)
    assert _leftovers(dest) == []


def _listed(dest: Path) -> list[str]:
    """What the Prior Loader would offer from ``dest``: every .safetensors file under it, hidden ones included."""
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*.safetensors")) if dest.exists() else []


def test_an_interrupted_transfer_keeps_a_hidden_partial_that_the_next_download_resumes(hub, prior_bytes, tmp_path):
    hub.add("authors/meta-lora", {"p.safetensors": prior_bytes}, modes={"p.safetensors": "cut"})
    dest = tmp_path / "meta_lora"
    with pytest.raises(RuntimeError, match="nothing was placed; .* bytes are kept in .* the next download continues"):
        download_prior(HubFile("authors/meta-lora", "p.safetensors"), dest)
    assert _listed(dest) == []  # nothing a loader lists
    (part,) = [p for p in dest.iterdir()]
    assert part.name.startswith(".p.safetensors.") and part.name.endswith(".part")
    half = len(prior_bytes) // 2
    assert part.stat().st_size == half
    assert hub.gets("p.safetensors") >= 2  # the dropped connection was retried within the run

    hub.repos["authors/meta-lora"].modes["p.safetensors"] = "ok"
    got = download_prior(HubFile("authors/meta-lora", "p.safetensors"), dest)
    assert hub.ranges("p.safetensors")[-1] == f"bytes={half}-"  # resumed, not from byte 0
    assert got.provenance["source_sha256"] == hashlib.sha256(prior_bytes).hexdigest()
    assert _leftovers(dest) == ["p.safetensors"]


def test_an_interrupted_transfer_that_resumes_gives_the_right_bytes(hub, prior_bytes, tmp_path):
    hub.add("authors/meta-lora", {"p.safetensors": prior_bytes}, modes={"p.safetensors": "cut_once"})
    got = download_prior(HubFile("authors/meta-lora", "p.safetensors"), tmp_path)
    assert got.provenance["source_sha256"] == hashlib.sha256(prior_bytes).hexdigest()
    assert hub.ranges("p.safetensors") == [None, f"bytes={len(prior_bytes) // 2}-"]  # the cut one, then the rest
    assert _leftovers(tmp_path) == ["p.safetensors", "src.safetensors"]


def _download_in_subprocess(url: str, dest: Path, home: Path, before_placing: str = "") -> subprocess.Popen:
    """``download_prior`` in its own process (``before_placing``: code run instead of placing the file)."""
    code = ("import sys, os, signal; import metalora_core.formats.hub as hub\n"
            + (f"hub.atomic_save_safetensors = lambda *a, **k: ({before_placing})\n" if before_placing else "")
            + "hub.download_prior(hub.HubFile('authors/meta-lora', 'p.safetensors'), sys.argv[1])\n")
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(home), "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-c", code, str(dest)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_a_download_killed_mid_transfer_leaves_nothing_listed_and_the_next_one_resumes(hub, prior_bytes, tmp_path):
    hub.add("authors/meta-lora", {"p.safetensors": prior_bytes}, modes={"p.safetensors": "hold"})
    dest = tmp_path / "meta_lora"
    half = len(prior_bytes) // 2
    proc = _download_in_subprocess(hub.url, dest, tmp_path / "hf_home")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            parts = list(dest.glob(".*.part")) if dest.exists() else []
            if parts and parts[0].stat().st_size >= half:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        hub.release.set()
        if proc.poll() is None:
            proc.kill()
    assert _listed(dest) == []
    (part,) = dest.iterdir()
    assert part.stat().st_size == half

    got = download_prior(HubFile("authors/meta-lora", "p.safetensors"), dest)
    assert hub.ranges("p.safetensors")[-1] == f"bytes={half}-"
    assert got.provenance["source_sha256"] == hashlib.sha256(prior_bytes).hexdigest()
    assert _leftovers(dest) == ["p.safetensors"]


def test_a_download_killed_after_the_transfer_leaves_nothing_listed_and_is_not_fetched_again(hub, prior_bytes, tmp_path):
    hub.add("authors/meta-lora", {"p.safetensors": prior_bytes})
    dest = tmp_path / "meta_lora"
    proc = _download_in_subprocess(hub.url, dest, tmp_path / "hf_home",
                                   before_placing="os.kill(os.getpid(), signal.SIGKILL)")
    proc.wait(120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    assert _listed(dest) == []
    (part,) = dest.iterdir()
    assert part.read_bytes() == prior_bytes  # the whole file, hidden, waiting to be checked and placed
    n = hub.gets("p.safetensors")
    got = download_prior(HubFile("authors/meta-lora", "p.safetensors"), dest)
    assert hub.gets("p.safetensors") == n  # complete: checked and placed without fetching it again
    assert got.provenance["source_sha256"] == hashlib.sha256(prior_bytes).hexdigest()
    assert _leftovers(dest) == ["p.safetensors"]


def test_the_next_download_removes_stale_leftovers(hub, prior_bytes, tmp_path):
    hub.add("authors/meta-lora", {"p.safetensors": prior_bytes})
    dest = tmp_path / "meta_lora"
    legacy = dest / ".metalora-download-k2j4h1x0"  # what older versions left: a complete file in a temp folder
    legacy.mkdir(parents=True)
    (legacy / "p.safetensors").write_bytes(prior_bytes)
    other_etag = dest / ".p.safetensors.0123456789abcdef.part"  # this name at an older ETag: never continued
    other_etag.write_bytes(b"x" * 10)
    old = dest / ".q.safetensors.0123456789abcdef.part"  # another file, untouched for weeks
    old.write_bytes(b"y" * 10)
    os.utime(old, (time.time() - 30 * 24 * 3600,) * 2)
    recent = dest / ".r.safetensors.0123456789abcdef.part"  # another file, interrupted recently: kept to resume
    recent.write_bytes(b"z" * 10)
    download_prior(HubFile("authors/meta-lora", "p.safetensors"), dest)
    assert _leftovers(dest) == [recent.name, "p.safetensors"]


def test_existing_file_from_elsewhere_is_never_overwritten(hub, prior_bytes, tmp_path):
    hub.add("authors/meta-lora", {"p.safetensors": prior_bytes})
    (tmp_path / "p.safetensors").write_bytes(_lora_bytes())  # placed by hand
    with pytest.raises(ValueError, match="already exists .*placed by hand"):
        download_prior(HubFile("authors/meta-lora", "p.safetensors"), tmp_path)
    assert (tmp_path / "p.safetensors").read_bytes() == _lora_bytes()
    got = download_prior(HubFile("authors/meta-lora", "p.safetensors"), tmp_path, force=True)
    assert got.prior.r1 == 4


def test_offline_mode_is_one_clear_error_and_keeps_a_downloaded_copy(hub, prior_bytes, tmp_path, monkeypatch):
    hub.add("authors/meta-lora", {"p.safetensors": prior_bytes})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set.*copy the file into"):
        download_prior(HubFile("authors/meta-lora", "p.safetensors"), tmp_path / "a")
    assert hub.requests == []  # offline: not one request
    monkeypatch.delenv("HF_HUB_OFFLINE")
    download_prior(HubFile("authors/meta-lora", "p.safetensors"), tmp_path / "a")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    n = len(hub.requests)
    assert download_prior(HubFile("authors/meta-lora", "p.safetensors"), tmp_path / "a").reused
    assert len(hub.requests) == n


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_download_and_one_line_error_without_a_server(hub, prior_bytes, tmp_path, monkeypatch, capsys):
    hub.add("authors/meta-lora", {"p.safetensors": prior_bytes})
    assert main(["download", "authors/meta-lora", "p.safetensors", "--dest", str(tmp_path / "m")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(tmp_path / "m" / "p.safetensors") and out["source_repo"] == "authors/meta-lora"

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    assert main(["download", "authors/meta-lora", "p.safetensors", "--dest", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "unreachable" in err and "hf download authors/meta-lora p.safetensors" in err
    assert f"copy the file into {tmp_path / 'n'}" in err
    assert _leftovers(tmp_path / "n") == []


@pytest.mark.parametrize("repo,filename,rev,msg", [
    ("", "p.safetensors", "main", "repo id"), ("a/b/c", "p.safetensors", "main", "repo id"),
    ("a/b", "../p.safetensors", "main", "inside the repository"), ("a/b", "p.ckpt", "main", "only .safetensors"),
    ("a/b", "p.safetensors", "", "revision"),
])
def test_hubfile_validates(repo, filename, rev, msg):
    with pytest.raises(ValueError, match=msg):
        HubFile(repo, filename, rev)


def test_nothing_touches_the_hub_at_import_or_when_loading_a_prior(tmp_path, prior_bytes):
    """Importing the CLI and the download module, and loading a prior, import no Hub client at all."""
    import subprocess
    import sys

    (tmp_path / "p.safetensors").write_bytes(prior_bytes)
    code = ("import sys; import metalora_core.cli, metalora_core.cli.download, metalora_core.formats.hub; "
            "from metalora_core.formats.prior import load_prior; load_prior(sys.argv[1]); "
            "assert 'huggingface_hub' not in sys.modules, 'huggingface_hub imported'")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.safetensors")], capture_output=True, text=True,
                       env={**__import__("os").environ, "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 0, r.stderr[-1500:]
