"""The pack's model folders in ComfyUI's folder registry (``folder_paths``)."""
from __future__ import annotations

import os

import folder_paths

PRIOR_FOLDER = "meta_lora"  # models/meta_lora: Meta-Down prior files (.safetensors)
CACHE_FOLDER = "meta_lora_cache"  # models/meta_lora/cache: trained-adapter cache (content-keyed)
CLIP_FOLDER = "metalora_clip"  # models/metalora_clip/<name>/: transformers CLIP folders for CLIP-T

# name -> (default folder inside models/, file extensions (empty: any), default folder first)
FOLDERS: dict[str, tuple[str, frozenset[str], bool]] = {
    PRIOR_FOLDER: ("meta_lora", frozenset({".safetensors"}), False),
    CACHE_FOLDER: (os.path.join("meta_lora", "cache"), frozenset({".safetensors"}), True),
    CLIP_FOLDER: ("metalora_clip", frozenset(), False),
}


def register_folders() -> None:
    """Registers every folder of ``FOLDERS`` with ComfyUI's ``add_model_folder_path``.

    Paths from extra_model_paths.yaml under the same names are kept; the default folder in
    ``models/`` is added (first for the cache, where new entries are written; last otherwise).
    """
    for name, (sub, exts, first) in FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, sub), is_default=first)
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(exts))
        folder_paths.filename_list_cache.pop(name, None)


def folder_list(name: str) -> list[str]:
    """The registered paths of one of the pack's folders (registering them on first use)."""
    if name not in folder_paths.folder_names_and_paths:
        register_folders()
    return folder_paths.get_folder_paths(name)


def cache_folder() -> str:
    """First registered cache folder (its first write creates it)."""
    return folder_list(CACHE_FOLDER)[0]


def prior_names() -> list[str]:
    folder_list(PRIOR_FOLDER)
    # the cache lives in meta_lora/cache; its adapter states are not priors; hidden files and folders
    # (temp files, a download's partial file) never are
    return [n for n in folder_paths.get_filename_list(PRIOR_FOLDER)
            if not n.replace(os.sep, "/").startswith("cache/")
            and not any(part.startswith(".") for part in n.replace(os.sep, "/").split("/"))]


def insightface_root() -> str:
    """Where insightface model packs are looked for (never downloaded): ``models/insightface``, or the
    first ``insightface`` path from extra_model_paths.yaml (registered like any model folder)."""
    if "insightface" in folder_paths.folder_names_and_paths:
        paths = folder_paths.get_folder_paths("insightface")
        if paths:
            return paths[0]
    return os.path.join(folder_paths.models_dir, "insightface")
