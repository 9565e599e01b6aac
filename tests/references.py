"""Independent references the tests compare against, and loading of the repository's scripts."""
from __future__ import annotations

import copy
import importlib.util
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def merged_float64(model: torch.nn.Module, adapters):
    """A float64 copy of ``model`` with every adapter's delta merged into its Linear's weight and no
    hooks (a copy made while attached would carry them along), and the float64 adapters whose
    Mid/Up that merged weight reaches through autograd: ``(reference model, adapters)``."""
    ref = copy.deepcopy(model).double()
    for m in ref.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    ad64 = copy.deepcopy(adapters).double()
    for name, a in ad64.items():
        mod = ref.get_submodule(name)
        w = mod.weight.detach()
        del mod.weight  # a plain tensor attribute: F.linear sees the merged weight, autograd reaches Mid/Up
        mod.weight = w + a.scale * a.up @ a.mid @ a.down
    return ref, ad64


def load_script(relative: str, *, register: bool = False) -> types.ModuleType:
    """The repository file ``relative`` (e.g. ``experiments/compare.py``) as a module; ``register``
    puts it in ``sys.modules`` first (dataclasses look their module up there)."""
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod
