"""The pack's model folders in ComfyUI's folder registry (``folder_paths``)."""
from __future__ import annotations

import os

import folder_paths

PRIOR_FOLDER = "meta_lora"  # models/meta_lora: Meta-Down prior files (.safetensors)
CACHE_FOLDER = "meta_lora_cache"  # models/meta_lora/cache: trained-adapter cache (content-keyed)


def register_folders() -> None:
    """Registers ``models/meta_lora`` (safetensors only) and its ``cache`` subfolder.

    Paths from extra_model_paths.yaml under ``meta_lora`` are kept; the default folder is added.
    """
    default = os.path.join(folder_paths.models_dir, "meta_lora")
    paths, _ = folder_paths.folder_names_and_paths.get(PRIOR_FOLDER, ([], set()))
    if default not in paths:
        paths = [*paths, default]
    folder_paths.folder_names_and_paths[PRIOR_FOLDER] = (paths, {".safetensors"})
    cache = os.path.join(default, "cache")
    cpaths, _ = folder_paths.folder_names_and_paths.get(CACHE_FOLDER, ([], set()))
    folder_paths.folder_names_and_paths[CACHE_FOLDER] = ([cache, *[p for p in cpaths if p != cache]], {".safetensors"})
    folder_paths.filename_list_cache.pop(PRIOR_FOLDER, None)


def cache_folder() -> str:
    """First registered cache folder (created on demand)."""
    if CACHE_FOLDER not in folder_paths.folder_names_and_paths:
        register_folders()
    path = folder_paths.get_folder_paths(CACHE_FOLDER)[0]
    os.makedirs(path, exist_ok=True)
    return path


def prior_names() -> list[str]:
    if PRIOR_FOLDER not in folder_paths.folder_names_and_paths:
        register_folders()
    # the cache lives in meta_lora/cache; its adapter states are not priors
    return [n for n in folder_paths.get_filename_list(PRIOR_FOLDER) if not n.replace(os.sep, "/").startswith("cache/")]


def insightface_folder() -> str:
    """Where insightface model packs are looked for: ``models/insightface``, or the first ``insightface``
    path from extra_model_paths.yaml (registered like any model folder)."""
    if "insightface" in folder_paths.folder_names_and_paths:
        paths = folder_paths.get_folder_paths("insightface")
        if paths:
            return paths[0]
    return os.path.join(folder_paths.models_dir, "insightface")
