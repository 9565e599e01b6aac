"""Stage-1 checkpoint files: a ``MetaTrainer.state_dict`` as safetensors (tensors + JSON metadata).

Layout (format version 2): ``down.<layer>`` and ``down.<layer>.adam.{step,exp_avg,exp_avg_sq}``;
``bank.<identity>.<layer>.{mid,up}`` with their ``.adam.*``; ``rng.generator``; the metadata's
``state`` holds step, config, data fingerprint, buckets, queue, losses and the bank's identities.
Version 1 files (which also held the global torch RNG state) still load.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from ...formats.files import atomic_save_safetensors, read_safetensors
from .bank import ADAM_KEYS, BankKey
from .config import MetaTrainConfig

CHECKPOINT_FORMAT = "metalora.metatrain-checkpoint"
CHECKPOINT_VERSION = 2  # 2: no global torch RNG state (version 1 files still load)


class _HasState(Protocol):
    def state_dict(self) -> dict[str, Any] | None: ...


def _adam_tensors(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.adam.{k}": state[k].detach().to("cpu").clone() for k in ADAM_KEYS if k in state}


def _split_adam(tensors: Mapping[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {k: tensors[f"{key}.adam.{k}"] for k in ADAM_KEYS if f"{key}.adam.{k}" in tensors}


def save_checkpoint(path: str | os.PathLike, trainer: _HasState | Mapping[str, Any]) -> Path | None:
    """Writes a trainer's ``state_dict`` (or the state itself) atomically as a safetensors file.

    Data-parallel: every rank calls it with its trainer; rank 0 writes the whole (gathered) state
    and returns the path, the other ranks write nothing and get None.
    """
    state = trainer if isinstance(trainer, Mapping) else trainer.state_dict()
    if state is None:
        return None
    tensors: dict[str, torch.Tensor] = {}
    for name, t in state["downs"].items():
        tensors[f"down.{name}"] = t
        if name in state["down_adam"]:
            tensors.update(_adam_tensors(f"down.{name}", state["down_adam"][name]))
    bank = state["bank"]
    for (ident, name, part), t in bank["params"].items():
        key = f"bank.{ident}.{name}.{part}"
        tensors[key] = t
        if (ident, name, part) in bank["adam"]:
            tensors.update(_adam_tensors(key, bank["adam"][(ident, name, part)]))
    tensors["rng.generator"] = state["generator"]
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "state": json.dumps({
            "step": state["step"],
            "config": state["config"],
            "data_fingerprint": state["data_fingerprint"],
            "buckets": state["buckets"],
            "queue": state["queue"],
            "queue_visit": state["queue_visit"],
            "losses": state["losses"],
            "bank_identities": sorted({k[0] for k in bank["params"]}),
        }),
    }
    return atomic_save_safetensors(tensors, path, meta)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint file back into a ``MetaTrainer.state_dict``.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: not a meta-train checkpoint, or one newer than this pack reads.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no checkpoint at {path} to resume from; run without resume first")
    tensors, meta = read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a meta-train checkpoint (format={meta.get('format')!r})")
    if int(meta.get("format_version", "0")) > CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {meta['format_version']} is newer than this pack reads")
    info = json.loads(meta["state"])
    layers = [k[len("down."):] for k in tensors if k.startswith("down.") and ".adam." not in k]
    params: dict[BankKey, torch.Tensor] = {}
    adam: dict[BankKey, dict[str, torch.Tensor]] = {}
    for ident in info["bank_identities"]:
        for n in layers:
            for part in ("mid", "up"):
                key = f"bank.{ident}.{n}.{part}"
                params[(ident, n, part)] = tensors[key]
                if s := _split_adam(tensors, key):
                    adam[(ident, n, part)] = s
    return {
        "step": info["step"], "config": info["config"], "data_fingerprint": info["data_fingerprint"],
        "buckets": info["buckets"], "queue": info["queue"], "queue_visit": info["queue_visit"],
        "losses": info["losses"],
        "downs": {n: tensors[f"down.{n}"] for n in layers},
        "down_adam": {n: s for n in layers if (s := _split_adam(tensors, f"down.{n}"))},
        "bank": {"params": params, "adam": adam},
        "generator": tensors["rng.generator"],
    }


def _config_for_compare(config: MetaTrainConfig) -> dict[str, Any]:
    d = config.to_dict()
    d.pop("steps")  # a resume may extend q_total; everything else must match
    return d


def check_resumable(state: Mapping[str, Any], config: MetaTrainConfig, data_fingerprint: str,
                    layers: set[str], *, source: str = "checkpoint") -> None:
    """Refuses a state that the run of ``config`` on this data and model cannot continue.

    Raises:
        ValueError: another config (names the field), other data, a step beyond ``steps``, or other
            adapter layers.
    """
    saved = _config_for_compare(MetaTrainConfig(**state["config"]))
    now = _config_for_compare(config)
    for k in now:
        if saved.get(k) != now[k]:
            raise ValueError(
                f"{source} was made with {k}={saved.get(k)!r} but this run has {k}={now[k]!r}; resume with the "
                "same settings (only --steps may change) or start a new run in another folder"
            )
    if state["data_fingerprint"] != data_fingerprint:
        raise ValueError(
            f"{source} was made from other training data (fingerprint {state['data_fingerprint'][:12]} vs "
            f"{data_fingerprint[:12]}); resume with the same data folder and augmentation, or start a new run"
        )
    if state["step"] > config.steps:
        raise ValueError(f"{source} is at step {state['step']}, beyond steps={config.steps}; raise --steps to resume")
    if set(state["downs"]) != layers:
        extra = sorted(set(state["downs"]) ^ layers)[:3]
        raise ValueError(f"{source} holds other adapter layers than this model's (e.g. {extra}); resume on the "
                         "model the run started with")
