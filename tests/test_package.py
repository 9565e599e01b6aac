"""The pack's shape as ComfyUI and installers see it, checked without ComfyUI."""
from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_root_package_imports_without_comfyui_and_is_v3_only():
    spec = importlib.util.spec_from_file_location("metalora_pack_under_test", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    assert callable(module.comfy_entrypoint)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS"), "a V1 mapping makes ComfyUI ignore comfy_entrypoint"
    assert "comfy_api" not in sys.modules and "comfy" not in sys.modules


def test_core_never_imports_comfyui():
    banned = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "nodes", "execution"}
    for path in (REPO / "metalora_core").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.relative_to(REPO)} imports {name}"


def test_pyproject_and_requirements_agree():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
    deps = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in meta["project"]["dependencies"]}
    reqs = {line.split(">")[0].split("=")[0].split("<")[0].strip().lower()
            for line in (REPO / "requirements.txt").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert reqs == deps, "requirements.txt (what ComfyUI installs) and [project].dependencies list the same"
    assert "torch" not in deps, "torch comes from ComfyUI (or the 'cli' extra), never as a dependency"


def test_cli_help_imports_no_torch():
    """`metalora --help` builds every subcommand's parser without importing torch, OpenCV or numpy."""
    code = ("import sys\nfrom metalora_core.cli import build_parser\nbuild_parser().format_help()\n"
            "heavy = sorted(m for m in ('torch', 'cv2', 'numpy', 'diffusers') if m in sys.modules)\n"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "", f"--help imported {out.stdout.strip()}"


def test_faces_lazy_exports_all_resolve():
    import metalora_core.faces as faces

    assert sorted(faces.__all__) == sorted(faces._EXPORTS)
    for name in faces.__all__:
        assert getattr(faces, name) is getattr(importlib.import_module(faces._EXPORTS[name], faces.__name__), name)


# The core's layers, lowest first: a package may import only packages of lower layers (or its own).
CORE_LAYERS = (("lora",), ("formats",), ("draw",), ("faces", "hosts"), ("data",), ("eval", "train"),
               ("synthfaces",), ("cli",))


def _package_imports(package: pathlib.Path) -> set[str]:
    """The core's other subpackages that the modules of ``package`` import (relative imports)."""
    core = REPO / "metalora_core"
    out = set()
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(core).parts[:-1])
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = parts[: len(parts) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                if target and target[0] != package.name:
                    out.add(target[0])
    return out


def test_core_packages_import_only_lower_layers():
    """cli -> train -> lora: no package imports one of its own layer or above (so there are no cycles)."""
    layer = {name: i for i, names in enumerate(CORE_LAYERS) for name in names}
    core = REPO / "metalora_core"
    packages = sorted(p for p in core.iterdir() if (p / "__init__.py").is_file())
    assert {p.name for p in packages} == set(layer), "a core package is missing from CORE_LAYERS"
    for package in packages:
        for target in _package_imports(package):
            if target in layer:  # (top-level modules such as __init__'s __version__ are fine)
                assert layer[target] < layer[package.name], f"metalora_core.{package.name} imports {target}"
