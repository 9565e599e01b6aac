#!/usr/bin/env python3
"""Convert a ComfyUI workflow saved by the editor (UI format) to API format, and optionally queue it.

The widget values of a UI workflow are a positional list; which value belongs to which input
comes from the node definitions ComfyUI serves at ``GET /object_info``. Standard library only.

Usage::

    # convert with the node definitions of a running ComfyUI (default http://127.0.0.1:8188)
    python tools/to_api.py example_workflows/01_one_click_meta_lora.json -o api.json
    # convert offline with a saved object_info (curl http://127.0.0.1:8188/object_info > object_info.json)
    python tools/to_api.py WORKFLOW.json --object-info object_info.json -o api.json
    # convert and queue on a server (POST /prompt); --set changes an input by node id or title
    python tools/to_api.py WORKFLOW.json --server http://127.0.0.1:8188 \\
        --set "Meta-LoRA Train.steps=375" --set 12.rank=2

Frontend-only nodes (Note, MarkdownNote, Reroute) are dropped, links through Reroute nodes are
followed, and muted (mode 2) or bypassed (mode 4) nodes are left out with every link from them.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8188"  # loopback: ComfyUI's default listen address and port
FRONTEND_ONLY = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a control_after_generate widget to these INTs
SKIPPED_MODES = (2, 4)  # 2: muted ("never"), 4: bypassed


class ConversionError(ValueError):
    """The workflow does not match the node definitions (unknown node type, too few widget values...)."""


def input_specs(info: Mapping[str, Any]) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of a node's inputs in definition order (required, then optional).

    ``type`` is a type string, or ``"COMBO"`` for a list of choices (V1 nodes give the list itself).
    """
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info.get("input", {}).items()}
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section, {})
        for name in order.get(section, []):
            spec = specs.get(name)
            if spec is None:
                continue
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            if isinstance(kind, list):
                opts = {**opts, "options": kind}
                kind = "COMBO"
            out.append((name, kind, opts))
    return out


def is_widget(kind: Any, opts: Mapping[str, Any]) -> bool:
    """True for inputs the editor shows as widgets (values in ``widgets_values``), not sockets."""
    return kind in WIDGET_TYPES and not opts.get("forceInput", False)


def widget_slots(info: Mapping[str, Any]) -> list[tuple[str | None, str, dict]]:
    """The ``widgets_values`` layout of a node: (input name or None for an extra UI-only widget, type, options).

    Extra widgets, as the editor adds them: ``control_after_generate`` after an INT named seed /
    noise_seed or any widget that asks for it, and the upload button after an ``image_upload`` combo.
    """
    slots: list[tuple[str | None, str, dict]] = []
    for name, kind, opts in input_specs(info):
        if not is_widget(kind, opts):
            continue
        slots.append((name, kind, opts))
        if opts.get("control_after_generate") or (kind == "INT" and name in SEED_NAMES):
            slots.append((None, "control_after_generate", {}))
        if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
            slots.append((None, "upload", {}))
    return slots


def _resolve(link_id: int, links: Mapping[int, list], nodes: Mapping[int, dict]) -> tuple[int, int] | None:
    """(origin node, origin slot) of a link, following Reroute nodes; None if it ends nowhere."""
    seen = set()
    while link_id is not None and link_id in links and link_id not in seen:
        seen.add(link_id)
        _, origin, slot = links[link_id][:3]
        node = nodes.get(origin)
        if node is None:
            return None
        if node.get("type") != "Reroute":
            return origin, slot
        ins = node.get("inputs") or []
        link_id = ins[0].get("link") if ins else None
    return None


def workflow_to_api(workflow: Mapping[str, Any], object_info: Mapping[str, Any]) -> dict[str, dict]:
    """Converts a UI-format workflow into an API-format prompt ``{node_id: {class_type, inputs, _meta}}``.

    Args:
        workflow: the JSON the editor saves (``nodes``, ``links``, ...).
        object_info: node definitions as served by ``GET /object_info`` (at least every type used).

    Returns:
        The API-format prompt, node ids as strings.

    Raises:
        ConversionError: a node type missing from ``object_info``, or widget values that do not
            fit its definition.
    """
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links = {int(ln[0]): [int(ln[0]), int(ln[1]), int(ln[2])] for ln in workflow.get("links", [])}
    if workflow.get("definitions", {}).get("subgraphs"):
        raise ConversionError("workflows with subgraphs are not supported; unpack them in the editor first")
    active = {i: n for i, n in nodes.items() if n.get("type") not in FRONTEND_ONLY and n.get("mode", 0) not in SKIPPED_MODES}
    missing = sorted({n["type"] for n in active.values() if n["type"] not in object_info})
    if missing:
        raise ConversionError(f"node types unknown to this ComfyUI: {missing}; install the packs that provide them")
    prompt: dict[str, dict] = {}
    for nid, node in sorted(active.items()):
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        values = node.get("widgets_values")
        slots = widget_slots(info)
        if isinstance(values, dict):  # some frontends save {name: value}
            inputs.update({name: values[name] for name, _, _ in slots if name is not None and name in values})
        elif values:
            real = [s for s in slots if s[0] is not None]
            if len(values) < len(slots) and len(values) == len(real):
                slots = real  # saved without the extra UI-only widgets
            optional = set(info.get("input", {}).get("optional", {}))
            tail = slots[len(values):]
            if tail and all(name is None or name in optional for name, _, _ in tail) and \
                    (tail[0][0] is not None or len(values) == len(slots) - len(tail)):
                # saved before these optional widgets existed: left out, the node uses their defaults
                slots = slots[:len(values)]
            if len(values) < len(slots):
                raise ConversionError(
                    f"node {nid} ({node['type']}): {len(values)} widget value(s) for {len(slots)} widget(s) "
                    f"{[s[0] or s[1] for s in slots]}")
            inputs.update({name: v for (name, _, _), v in zip(slots, values) if name is not None})
        for inp in node.get("inputs") or []:
            link = inp.get("link")
            if link is None:
                continue
            src = _resolve(int(link), links, nodes)
            if src is None or src[0] not in active:
                continue  # from a muted/bypassed node: a widget keeps its value, a socket stays empty
            inputs[inp["name"]] = [str(src[0]), src[1]]
        prompt[str(nid)] = {"class_type": node["type"], "inputs": inputs,
                            "_meta": {"title": node.get("title") or info.get("display_name") or node["type"]}}
    return prompt


def apply_overrides(prompt: dict[str, dict], assignments: list[str]) -> None:
    """Applies ``NODE.input=value`` assignments (NODE: id or title; value parsed as JSON if it can be)."""
    for item in assignments:
        target, sep, raw = item.partition("=")
        node_ref, dot, name = target.rpartition(".")
        if not sep or not dot:
            raise ConversionError(f"--set {item!r}: expected NODE.input=value (NODE is a node id or title)")
        ids = [k for k, v in prompt.items() if k == node_ref or v["_meta"]["title"] == node_ref]
        if not ids:
            raise ConversionError(f"--set {item!r}: no node with id or title {node_ref!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        for k in ids:
            prompt[k]["inputs"][name] = value


def _http_json(url: str, payload: Any = None, timeout: float = 30.0) -> Any:
    data = None if payload is None else json.dumps(payload).encode("utf-8")
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as e:  # /prompt answers 400 with node_errors for an invalid graph
        body = e.read().decode("utf-8", "replace")
        raise RuntimeError(f"{url}: HTTP {e.code}: {body}") from e
    except urllib.error.URLError as e:
        raise RuntimeError(f"cannot reach {url} ({e.reason}); is ComfyUI running there?") from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="UI-format workflow JSON (as saved by the ComfyUI editor)")
    ap.add_argument("-o", "--output", help="write the API-format JSON here (default: stdout unless queuing)")
    ap.add_argument("--object-info", help="node definitions from a file instead of the server's GET /object_info")
    ap.add_argument("--server", help=f"queue the prompt on this ComfyUI (POST /prompt), e.g. {DEFAULT_SERVER}")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.input=value",
                    help="change an input before queuing; NODE is a node id or title; repeatable")
    args = ap.parse_args(argv)
    with open(args.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    base = (args.server or DEFAULT_SERVER).rstrip("/")
    if args.object_info:
        with open(args.object_info, encoding="utf-8") as f:
            info = json.load(f)
    else:
        info = _http_json(f"{base}/object_info")
    prompt = workflow_to_api(workflow, info)
    apply_overrides(prompt, args.set)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(prompt, f, indent=2)
    elif not args.server:
        json.dump(prompt, sys.stdout, indent=2)
        sys.stdout.write("\n")
    if args.server:
        answer = _http_json(f"{base}/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})
        print(f"queued prompt {answer.get('prompt_id')} (queue position {answer.get('number')}) on {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
