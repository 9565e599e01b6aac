"""`tools/to_api.py --server` against a real headless ComfyUI server on loopback.

Starts ``main.py --cpu --listen 127.0.0.1`` with its own base directory (the pack linked into its
``custom_nodes/``), converts a UI-format workflow with the server's ``/object_info``, queues it
with ``POST /prompt`` and waits for the result in ``/history``. Needs ``COMFYUI_PATH``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from comfy_fixtures import SKIP_REASON, comfyui_path

REPO = pathlib.Path(__file__).resolve().parents[1]
if comfyui_path() is None:
    pytest.skip(f"SKIPPED: {SKIP_REASON}", allow_module_level=True)
sys.path.insert(0, str(REPO / "tools"))
import to_api  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def _ui_workflow(photo: str) -> dict:
    """LoadImage -> MetaLoRAFaceAugment -> SaveImage (the crop preview), in the editor's format."""
    def node(i, type_, inputs, outputs, widgets):
        return {"id": i, "type": type_, "pos": [i * 300, 0], "size": [280, 200], "flags": {}, "order": i - 1,
                "mode": 0, "inputs": inputs, "outputs": outputs, "properties": {}, "widgets_values": widgets}

    return {
        "last_node_id": 3, "last_link_id": 2, "version": 0.4, "config": {}, "extra": {}, "groups": [],
        "nodes": [
            node(1, "LoadImage", [], [{"name": "IMAGE", "type": "IMAGE", "links": [1], "slot_index": 0},
                                      {"name": "MASK", "type": "MASK", "links": [], "slot_index": 1}], [photo, "image"]),
            node(2, "MetaLoRAFaceAugment", [{"name": "image", "type": "IMAGE", "link": 1}],
                 [{"name": "crops", "type": "FACE_CROPS", "links": [], "slot_index": 0},
                  {"name": "preview", "type": "IMAGE", "links": [2], "slot_index": 1}],
                 ["yunet", 0, "fixed", 128, "paper_grid"]),
            node(3, "SaveImage", [{"name": "images", "type": "IMAGE", "link": 2}], [], ["server_test"]),
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 1, 3, 0, "IMAGE"]],
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, sample):
    base = tmp_path_factory.mktemp("comfy_server")
    for sub in ("custom_nodes", "input", "output", "models", "frontend"):
        (base / sub).mkdir()
    os.symlink(REPO, base / "custom_nodes" / "ComfyUI-MetaLoRA")
    shutil.copy(sample("obama"), base / "input" / "obama.jpg")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    log = open(base / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
         "--front-end-root", str(base / "frontend"), "--base-directory", str(base)],
        cwd=comfyui_path(), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # the first start imports torch and every node pack: up to a minute or two
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}: {(base / 'server.log').read_text()[-3000:]}")
            try:
                _get(f"{url}/system_stats")
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"ComfyUI did not answer at {url}: {(base / 'server.log').read_text()[-3000:]}")
        yield url, base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_to_api_queues_on_a_running_server(server, tmp_path, capsys):
    url, base = server
    info = _get(f"{url}/object_info")
    assert "MetaLoRATrain" in info and "MetaLoRAFaceAugment" in info, "the pack loaded in the server"
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(_ui_workflow("obama.jpg")))
    assert to_api.main([str(wf), "--server", url, "--set", "2.seed=3"]) == 0
    line = capsys.readouterr().out
    assert "queued prompt" in line
    prompt_id = line.split("queued prompt ")[1].split()[0]
    for _ in range(240):
        history = _get(f"{url}/history/{prompt_id}")
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed"):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"prompt {prompt_id} did not finish: {(base / 'server.log').read_text()[-3000:]}")
    entry = history[prompt_id]
    assert entry["status"]["status_str"] == "success"
    saved = entry["outputs"]["3"]["images"]
    assert saved and (base / "output" / saved[0]["filename"]).is_file()
    assert entry["prompt"][2]["2"]["inputs"]["seed"] == 3  # --set reached the queued graph


def test_server_rejects_an_invalid_graph_with_node_errors(server, tmp_path):
    url, _ = server
    wf = _ui_workflow("no_such_photo.jpg")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(wf))
    with pytest.raises(RuntimeError, match="HTTP 400"):
        to_api.main([str(path), "--server", url])


def _status(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, "", b""


def test_object_info_has_fixed_seeds_and_the_download_node(server):
    url, _ = server
    info = _get(f"{url}/object_info")
    for node in ("MetaLoRATrain", "MetaLoRAFaceAugment"):
        assert info[node]["input"]["required"]["seed"][1]["control_after_generate"] == "fixed"
    assert "MetaLoRAPriorDownload" in info
    assert info["MetaLoRATrain"]["output"][2:4] == ["LORA_MODEL", "LOSS_MAP"]


def test_template_browser_lists_every_template_with_its_thumbnail(server):
    url, _ = server
    listed = _get(f"{url}/workflow_templates")["ComfyUI-MetaLoRA"]
    shipped = sorted(p.stem for p in (REPO / "example_workflows").glob("*.json"))
    assert sorted(listed) == shipped
    for name in shipped:
        status, kind, body = _status(f"{url}/api/workflow_templates/ComfyUI-MetaLoRA/{name}.jpg")
        assert status == 200 and kind == "image/jpeg" and body[:3] == b"\xff\xd8\xff", name
        status, _, body = _status(f"{url}/api/workflow_templates/ComfyUI-MetaLoRA/{name}.json")
        assert status == 200 and json.loads(body)["nodes"]
    # scripts are not in the served folder any more
    for path in ("to_api.py", "support/build_workflows.py", "../tools/to_api.py"):
        assert _status(f"{url}/api/workflow_templates/ComfyUI-MetaLoRA/{path}")[0] in (403, 404), path


def test_help_pages_are_served_for_every_pack_node(server):
    url, _ = server
    info = _get(f"{url}/object_info")
    ours = [k for k, v in info.items() if v.get("python_module", "").endswith("ComfyUI-MetaLoRA")
            or k.startswith("MetaLoRA")]
    docs = sorted(p.stem for p in (REPO / "web" / "docs").glob("*.md"))
    assert docs and set(docs) <= set(ours)
    for node in ("MetaLoRATrain", "MetaLoRAFaceAugment", "MetaLoRAPriorDownload"):
        status, _, body = _status(f"{url}/extensions/ComfyUI-MetaLoRA/docs/{node}.md")
        assert status == 200 and body.decode().startswith("# "), node
    assert "train lora" in info["MetaLoRATrain"].get("search_aliases", [])
