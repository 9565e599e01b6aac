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


class _Socket:
    """The server's websocket for one client, read in a thread: (arrival time, event, data) each.

    A progress text (ComfyUI's binary frame 3: node id length, node id, text) is recorded as
    ``("progress_text", {"node": ..., "text": ...})``.
    """

    def __init__(self, url: str):
        import threading
        import uuid

        self.client_id = uuid.uuid4().hex
        self.events: list[tuple[float, str, dict]] = []
        self._url = url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "no websocket connection"

    def _run(self) -> None:
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._read())

    async def _read(self) -> None:
        import struct

        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self._url) as ws:
            self._ws = ws
            self._ready.set()
            async for msg in ws:
                now = time.monotonic()
                if msg.type == aiohttp.WSMsgType.TEXT:
                    d = json.loads(msg.data)
                    self.events.append((now, d["type"], d.get("data") or {}))
                elif msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", msg.data[:4])[0] == 3:
                    n = struct.unpack(">I", msg.data[4:8])[0]
                    self.events.append((now, "progress_text", {"node": msg.data[8:8 + n].decode(),
                                                               "text": msg.data[8 + n:].decode()}))

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self._ws.close(), self._loop).result(10)
        self._thread.join(10)

    def run(self, url: str, prompt: dict, timeout: float = 600) -> list[tuple[float, str, dict]]:
        """Queues ``prompt`` for this client and returns its events once it has finished."""
        req = urllib.request.Request(f"{url}/prompt", data=json.dumps({"prompt": prompt, "client_id": self.client_id}).encode(),
                                     headers={"Content-Type": "application/json"})
        first = len(self.events)
        with urllib.request.urlopen(req, timeout=30) as r:
            prompt_id = json.loads(r.read())["prompt_id"]
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            mine = [e for e in self.events[first:] if e[2].get("prompt_id", prompt_id) == prompt_id]
            done = [e for e in mine if e[1] in ("execution_success", "execution_error")]
            if done:
                assert done[0][1] == "execution_success", done[0][2]
                return mine
            time.sleep(0.2)
        pytest.fail(f"prompt {prompt_id} did not finish")


def _train_graph(names: dict, steps: int) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": names["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": names["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": names["vae"]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a man", "clip": ["2", 0]}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "obama.jpg"}},
        "6": {"class_type": "MetaLoRAFaceAugment",
              "inputs": {"image": ["5", 0], "detector": "yunet", "seed": 0, "bucket_resolution": 128}},
        "7": {"class_type": "MetaLoRATrain",
              "inputs": {"model": ["1", 0], "vae": ["3", 0], "crops": ["6", 0], "positive": ["4", 0],
                         "steps": steps, "rank": 1, "learning_rate": 4e-4, "seed": 0, "resolution": 128,
                         "gradient_checkpointing": False, "preview_every": 0, "force_retrain": False}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}},
    }


def test_a_steps_change_reaches_its_first_step_without_encoding_again(server, capsys):
    """Crops + VAE straight into Train, in a running server: the first run encodes the crops and
    their mirror images; after a change of steps the first training step comes in under 5 % of
    that encode time (both measured from the websocket's events: the node starting, its encode
    message, its first progress event)."""
    from comfy_fixtures import write_tiny_flux_models

    url, base = server
    names = write_tiny_flux_models(base / "models", seed=0)
    sock = _Socket(url)
    try:
        def node_events(events):
            start = next(t for t, e, d in events if e == "executing" and d.get("node") == "7")
            texts = [(t, d["text"]) for t, e, d in events if e == "progress_text" and d["node"] == "7"]
            step = next(t for t, e, d in events if e == "progress" and d.get("node") == "7" and d["value"] >= 1)
            return start, texts, step

        start, texts, _ = node_events(sock.run(url, _train_graph(names, steps=2)))
        t_encoded, line = next((t, s) for t, s in texts if s.startswith("encoded "))
        encode_s = t_encoded - start
        start, texts, step = node_events(sock.run(url, _train_graph(names, steps=3)))
        first_step_s = step - start
    finally:
        sock.close()
    assert texts[0][1].startswith("crop latents reused: ") and texts[0][1].endswith("(no VAE work)"), texts
    with capsys.disabled():
        print(f"\n[metalora] server: first run's encode {encode_s:.2f} s ({line!r}); after a steps change, "
              f"node start to first step {first_step_s:.3f} s = {first_step_s / encode_s:.1%} of it")
    assert first_step_s < 0.05 * encode_s
