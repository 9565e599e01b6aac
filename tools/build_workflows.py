#!/usr/bin/env python3
"""Generates the example workflows in ``example_workflows/`` (ComfyUI editor format) from short Python
descriptions, so that widget order, link ids and slot numbers are always consistent.

The node definitions come from ``node_schemas.json`` next to this file: a normalised snapshot of
ComfyUI's ``GET /object_info`` for every node type the workflows use (ours and ComfyUI core's),
written and checked against a real ComfyUI by ``tests/test_comfyui_workflows.py``
(``METALORA_UPDATE_SNAPSHOT=1`` rewrites it). Third-party node types (PuLID-FLUX) are declared in
``third_party_nodes.json``. Standard library only.

    python tools/build_workflows.py          # rewrite example_workflows/*.json
    python tools/build_workflows.py --check  # exit 1 if a shipped file differs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKFLOWS = HERE.parent / "example_workflows"  # the folder ComfyUI serves to its template browser
sys.path.insert(0, str(HERE))
from to_api import input_specs, is_widget, widget_slots  # noqa: E402

PACK_ID, PACK_VERSION = "comfyui-metalora", "0.1.0"
COMFY_VERSION = "0.33.0"
SCHEMAS_FILE = HERE / "node_schemas.json"
THIRD_PARTY_FILE = HERE / "third_party_nodes.json"
# Inputs whose choices are files on the user's disk: the snapshot keeps no options for them.
FILE_INPUTS = frozenset({"unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name", "image", "prior_name",
                         "clip_model", "lora_name", "ckpt_name"})
# ComfyUI core node types the workflows use (checked against the real checkout in the ComfyUI tier).
CORE_NODES = ("UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "FluxGuidance",
              "ConditioningZeroOut", "EmptySD3LatentImage", "EmptyFlux2LatentImage", "KSampler", "ModelSamplingAuraFlow",
              "RandomNoise", "KSamplerSelect", "Flux2Scheduler", "CFGGuider", "SamplerCustomAdvanced", "VAEDecode",
              "SaveImage", "PreviewImage", "LoadImage", "ImageBatch", "PreviewAny")
OUR_NODES = ("MetaLoRAPriorLoader", "MetaLoRAFaceAugment", "MetaLoRATrain", "MetaLoRAApply", "MetaLoRASave",
             "MetaLoRAClipT", "MetaLoRAFaceSim", "MetaLoRAImageGrid")
FRONTEND_ONLY = ("Note", "MarkdownNote")

# Model file names of the usual FLUX.1-dev download (Comfy-Org / black-forest-labs repacks).
FLUX_UNET, CLIP_L, T5XXL, FLUX_VAE = "flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"
PRIOR_FILE = "meta_lora_prior_flux1_dev.safetensors"
# properties.models of the loader nodes: the frontend offers these downloads when a file is missing.
# URLs as ComfyUI's FLUX examples document them (the FLUX.1-dev repository is gated: accept its licence first).
MODEL_FILES = {
    FLUX_UNET: ("https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/flux1-dev.safetensors", "diffusion_models"),
    CLIP_L: ("https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors", "text_encoders"),
    T5XXL: ("https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors", "text_encoders"),
    FLUX_VAE: ("https://huggingface.co/black-forest-labs/FLUX.1-dev/resolve/main/ae.safetensors", "vae"),
}
# FLUX.2 Klein 4B (distilled) and Z-Image Turbo: the files and URLs of ComfyUI's own templates for them
# (Comfy-Org repacks; both models are Apache-2.0 and not gated). Z-Image decodes with the FLUX.1 VAE.
KLEIN_UNET, QWEN3_4B, FLUX2_VAE = "flux-2-klein-4b.safetensors", "qwen_3_4b.safetensors", "flux2-vae.safetensors"
ZIMAGE_UNET = "z_image_turbo_bf16.safetensors"
_HF = "https://huggingface.co/Comfy-Org"
KLEIN_FILES = {
    KLEIN_UNET: (f"{_HF}/flux2-klein/resolve/main/split_files/diffusion_models/{KLEIN_UNET}", "diffusion_models"),
    QWEN3_4B: (f"{_HF}/flux2-klein/resolve/main/split_files/text_encoders/{QWEN3_4B}", "text_encoders"),
    FLUX2_VAE: (f"{_HF}/flux2-dev/resolve/main/split_files/vae/{FLUX2_VAE}", "vae"),
}
ZIMAGE_FILES = {
    ZIMAGE_UNET: (f"{_HF}/z_image_turbo/resolve/main/split_files/diffusion_models/{ZIMAGE_UNET}", "diffusion_models"),
    QWEN3_4B: (f"{_HF}/z_image_turbo/resolve/main/split_files/text_encoders/{QWEN3_4B}", "text_encoders"),
    FLUX_VAE: (f"{_HF}/z_image_turbo/resolve/main/split_files/vae/{FLUX_VAE}", "vae"),
}
KLEIN_PRIOR, ZIMAGE_PRIOR = "meta_lora_prior_flux2_klein_4b.safetensors", "meta_lora_prior_z_image_turbo.safetensors"
CLIP_T_FOLDER = "clip-vit-base-patch32"
PHOTO, HELD_OUT = "person.jpg", ("person_2.jpg", "person_3.jpg")
TRAIN_CAPTION = "a photo of a man"

DOWNLOAD_NOTE = f"""Meta-LoRA one-click: what to download and where (nothing downloads by itself)

models/diffusion_models/{FLUX_UNET}   FLUX.1-dev transformer (black-forest-labs/FLUX.1-dev, licence: FLUX.1 [dev] non-commercial)
models/text_encoders/{CLIP_L}          CLIP-L text encoder (comfyanonymous/flux_text_encoders)
models/text_encoders/{T5XXL}       T5-XXL text encoder, same repo (t5xxl_fp8_e4m3fn.safetensors works too)
models/vae/{FLUX_VAE}                         FLUX VAE (black-forest-labs/FLUX.1-dev, file ae.safetensors)
models/meta_lora/{PRIOR_FILE}  a Meta-Down prior (.safetensors): make one with 'metalora meta-train', or
  fetch one from a Hub repository with the Meta-LoRA Prior Download node (in place of the Prior Loader) or
  'metalora download REPO_ID FILE --dest ComfyUI/models/meta_lora'. A FLUX LoRA file can serve as one (its lora_A).
  Without a prior, disconnect 'prior' on the train node: that trains a plain LoRA (the paper's baseline).
The loaders list download links for the FLUX files (the editor offers them when a file is missing).

Put ONE photo of the person in ComfyUI/input and pick it in Load Image (the face should be clearly visible).
Set the class caption (man / woman) in 'training caption'. Training: 375 steps, rank 1 (paper settings);
the result is cached on disk, so changing only the prompts and queueing again skips training.
The LoRA is saved to models/loras/metalora/ and works in any FLUX LoRA loader."""

def _family_note(title: str, files: dict[str, tuple[str, str]], descriptions: dict[str, str], prior: str,
                 sampling: str) -> str:
    """The download note of a one-click graph for one more model family (the FLUX.1-dev note's layout)."""
    rows = [(f"models/{files[n][1]}/{n}", descriptions[n]) for n in files] + [(f"models/meta_lora/{prior}", "")]
    width = max(len(path) for path, _ in rows[:-1]) + 2
    table = "\n".join(f"{path:<{width}}{text}".rstrip() for path, text in rows)
    return f"""Meta-LoRA one-click for {title}: what to download and where (nothing downloads by itself)

{table}
  a Meta-Down prior made for {title} (its family and widths): make one with 'metalora meta-train', or
  fetch one with the Meta-LoRA Prior Download node (in place of the Prior Loader). A prior made for
  another family is refused in one line naming both. Without a prior, disconnect 'prior' on the train
  node: that trains a plain LoRA (the paper's baseline).
The loaders list download links for the model files (the editor offers them when a file is missing).

Put ONE photo of the person in ComfyUI/input and pick it in Load Image (the face should be clearly visible).
Set the class caption (man / woman) in 'training caption'. Training: 375 steps, rank 1 (the paper's
FLUX.1-dev settings); the result is cached on disk, so changing only the prompts and queueing again skips
training. {sampling}
The LoRA is saved to models/loras/metalora/ and loads with Load LoRA on {title}."""


KLEIN_NOTE = _family_note(
    "FLUX.2 Klein 4B", KLEIN_FILES,
    {KLEIN_UNET: "FLUX.2 Klein 4B, distilled (Comfy-Org/flux2-klein; licence Apache-2.0)",
     QWEN3_4B: "Qwen3-4B text encoder (same repository)",
     FLUX2_VAE: "FLUX.2 VAE (Comfy-Org/flux2-dev)"},
    KLEIN_PRIOR,
    "Sampling as ComfyUI's own Klein 4B template: 4 steps, cfg 1 (the model is distilled), Flux2Scheduler, "
    "1024x1024.")
ZIMAGE_NOTE = _family_note(
    "Z-Image Turbo", ZIMAGE_FILES,
    {ZIMAGE_UNET: "Z-Image Turbo (Comfy-Org/z_image_turbo; licence Apache-2.0)",
     QWEN3_4B: "Qwen3-4B text encoder (same repository)",
     FLUX_VAE: "the FLUX.1 VAE, which Z-Image decodes with (same repository)"},
    ZIMAGE_PRIOR,
    "Sampling as ComfyUI's own Z-Image Turbo template: shift 3 (ModelSamplingAuraFlow), 8 steps, cfg 1, "
    "res_multistep, 1024x1024.")


T1 = "A man in a firefighter uniform, standing in front of a firetruck, looking straight ahead."
T1B = "A man riding a bicycle under the Eiffel Tower, smiling at the camera."
T2 = "A man as a cyberpunk character, neon lights reflecting on his face, highly detailed."
T2B = "A pencil drawing of a man, highly detailed, face in full view."
T3 = ("A man standing in a sunlit urban plaza, facing directly toward the camera with a fully visible, highly "
      "detailed face and direct eye contact.",
      "A man in a casual outfit, positioned in a blooming garden with soft natural light, his face clearly visible "
      "and his eyes meeting the camera.",
      "A man in elegant attire, standing against a scenic landscape at sunrise, his face captured in sharp detail "
      "with a steady, direct gaze.",
      "A man in a relaxed, stylish ensemble, posed on a quiet beach at sunset, with a fully visible, richly detailed "
      "face and clear eye contact.")


# --------------------------------------------------------------------------------------------
# Node definitions


def normalise_info(info: dict[str, Any]) -> dict[str, Any]:
    """The parts of one ``/object_info`` entry the workflows depend on (no tooltips, no file lists)."""
    inputs = []
    for name, kind, opts in input_specs(info):
        keep = {k: opts[k] for k in ("default", "min", "max", "step", "control_after_generate", "image_upload",
                                     "forceInput", "multiline") if k in opts}
        if kind == "COMBO" and name not in FILE_INPUTS:
            keep["options"] = list(opts.get("options", []))
        optional = name in (info.get("input", {}).get("optional") or {})
        inputs.append([name, kind, keep, optional])
    outputs = [[n, t] for n, t in zip(info.get("output_name") or info.get("output", []), info.get("output", []))]
    return {"display_name": info.get("display_name") or info.get("name"), "inputs": inputs, "outputs": outputs,
            "output_node": bool(info.get("output_node"))}


def snapshot(object_info: dict[str, Any]) -> dict[str, Any]:
    """Normalised definitions of every node type the workflows use (ours + core), sorted by name."""
    return {t: normalise_info(object_info[t]) for t in sorted({*CORE_NODES, *OUR_NODES}) if t in object_info}


def as_object_info(schemas: dict[str, Any]) -> dict[str, Any]:
    """Turns normalised definitions back into ``/object_info``-shaped entries (for ``to_api``)."""
    out = {}
    for t, s in schemas.items():
        req = {n: [k, o] for n, k, o, opt in s["inputs"] if not opt}
        opt = {n: [k, o] for n, k, o, o2 in s["inputs"] if o2}
        out[t] = {"input": {"required": req, "optional": opt},
                  "input_order": {"required": list(req), "optional": list(opt)},
                  "output": [k for _, k in s["outputs"]], "output_name": [n for n, _ in s["outputs"]],
                  "output_node": s["output_node"], "name": t, "display_name": s.get("display_name", t)}
    return out


def load_schemas() -> dict[str, Any]:
    """Our + core definitions (snapshot) and the declared third-party ones, ``/object_info``-shaped."""
    schemas = json.loads(SCHEMAS_FILE.read_text(encoding="utf-8"))
    third = json.loads(THIRD_PARTY_FILE.read_text(encoding="utf-8"))
    for pack in third["packs"].values():
        schemas.update(pack["node_types"])
    return as_object_info(schemas)


def third_party_packs() -> dict[str, Any]:
    return json.loads(THIRD_PARTY_FILE.read_text(encoding="utf-8"))["packs"]


# --------------------------------------------------------------------------------------------
# A tiny graph builder


class Graph:
    """Collects nodes, links and groups and writes the editor's JSON (format version 0.4)."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []
        self._owner = {t: pid for pid, p in third_party_packs().items() for t in p["node_types"]}
        self._repo = {pid: p["repo"] for pid, p in third_party_packs().items()}

    def _properties(self, node_type: str) -> dict[str, Any]:
        props: dict[str, Any] = {"Node name for S&R": node_type}
        if node_type in OUR_NODES:
            props.update(cnr_id=PACK_ID, ver=PACK_VERSION)
        elif node_type in self._owner:
            props.update(aux_id=self._repo[self._owner[node_type]])
        else:
            props.update(cnr_id="comfy-core", ver=COMFY_VERSION)
        return props

    def add(self, node_type: str, pos: tuple[float, float], title: str | None = None, *, node_width: int = 320,
            **widgets: Any) -> dict:
        info = self.info[node_type]
        specs = input_specs(info)
        sockets = [(n, k) for n, k, o in specs if not is_widget(k, o)]
        values = []
        for name, kind, opts in widget_slots(info):
            if name is None:
                values.append("fixed" if kind == "control_after_generate" else "image")
            elif name in widgets:
                values.append(widgets.pop(name))
            elif "default" in opts:
                values.append(opts["default"])
            elif opts.get("options"):
                values.append(opts["options"][0])  # the editor's default for a combo
            else:
                raise ValueError(f"{node_type}: widget {name!r} needs a value")
        if widgets:
            raise ValueError(f"{node_type}: unknown widgets {sorted(widgets)}")
        # the editor's metrics: about 24 px per slot row, 26 per widget (a seed's control widget too)
        tall = sum(130 if o.get("multiline") else 26 for _, _, o in widget_slots(info))
        height = 16 + 24 * max(len(sockets), len(info["output"])) + tall
        node = {
            "id": len(self.nodes) + 1, "type": node_type, "pos": [pos[0], pos[1]], "size": [node_width, height],
            "flags": {}, "order": len(self.nodes), "mode": 0,
            "inputs": [{"name": n, "type": k, "link": None} for n, k in sockets],
            "outputs": [{"name": n, "type": k, "links": [], "slot_index": i}
                        for i, (n, k) in enumerate(zip(info["output_name"], info["output"]))],
            "properties": self._properties(node_type),
            "widgets_values": values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def note(self, text: str, pos: tuple[float, float], size: tuple[int, int] = (440, 260), title: str | None = None) -> dict:
        node = {"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size), "flags": {},
                "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                "widgets_values": [text], "color": "#432", "bgcolor": "#653"}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node

    def link(self, src: dict, out: int | str, dst: dict, inp: str) -> None:
        slot = out if isinstance(out, int) else [o["name"] for o in src["outputs"]].index(out)
        target = [i["name"] for i in dst["inputs"]].index(inp)
        kind = src["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        self.links.append([link_id, src["id"], slot, dst["id"], target, kind])
        src["outputs"][slot]["links"].append(link_id)
        dst["inputs"][target]["link"] = link_id

    def group(self, title: str, members: list[dict], color: str = "#3f789e") -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "members": members, "color": color})

    TITLE_H = 30  # the editor draws a node's title bar above its pos
    GAP = 24  # between nodes
    BLOCK_GAP = 40  # between groups (and loose nodes)
    PAD = 24  # group padding around its nodes; a group's title row sits above that
    GROUP_TITLE = 40
    NESTED_TITLE = 50  # extra title row of a group that holds another group

    def _box(self, nodes: list[dict], pad: int) -> list[float]:
        """[x, y, w, h] around nodes (title bars included), ``pad`` on every side."""
        x0 = min(n["pos"][0] for n in nodes) - pad
        y0 = min(n["pos"][1] - self.TITLE_H for n in nodes) - pad
        x1 = max(n["pos"][0] + n["size"][0] for n in nodes) + pad
        y1 = max(n["pos"][1] + n["size"][1] for n in nodes) + pad
        return [x0, y0, x1 - x0, y1 - y0]

    @staticmethod
    def _overlap(a: list[float], b: list[float], margin: float = 0) -> bool:
        return (a[0] < b[0] + b[2] + margin and b[0] < a[0] + a[2] + margin
                and a[1] < b[1] + b[3] + margin and b[1] < a[1] + a[3] + margin)

    def _group_boxes(self) -> list[list[float]]:
        """Group boxes from the current node positions; a group holding another grows around it."""
        boxes = []
        for grp in self.groups:
            box = self._box(grp["members"], self.PAD)
            boxes.append([box[0], box[1] - self.GROUP_TITLE, box[2], box[3] + self.GROUP_TITLE])
        for i in sorted(range(len(boxes)), key=lambda i: boxes[i][2] * boxes[i][3]):
            for j in self._outer_of.get(i, ()):
                inner, outer = boxes[i], boxes[j]
                x0, y0 = min(outer[0], inner[0] - self.PAD), min(outer[1], inner[1] - self.NESTED_TITLE)
                x1 = max(outer[0] + outer[2], inner[0] + inner[2] + self.PAD)
                y1 = max(outer[1] + outer[3], inner[1] + inner[3] + self.PAD)
                boxes[j] = [x0, y0, x1 - x0, y1 - y0]
        return boxes

    def _layout(self) -> list[list[float]]:
        """Lays the graph out without overlaps, keeping the builder's arrangement.

        Groups that sit inside another group form one block with it; every other node is a block
        of its own. Inside a block, nodes move down below the nodes above them in their column
        (title bars included); then whole blocks move down, in their top-to-bottom order, until
        no block overlaps one above it. Returns the group boxes.
        """
        # nesting, from the builder's intended positions
        self._outer_of: dict[int, list[int]] = {}
        boxes = [self._box(g["members"], self.PAD) for g in self.groups]
        for i, inner in enumerate(boxes):
            cx, cy = inner[0] + inner[2] / 2, inner[1] + inner[3] / 2
            for j, outer in enumerate(boxes):
                if j != i and outer[2] * outer[3] > inner[2] * inner[3] and \
                        outer[0] <= cx <= outer[0] + outer[2] and outer[1] <= cy <= outer[1] + outer[3]:
                    self._outer_of.setdefault(i, []).append(j)
        block_of_group = list(range(len(self.groups)))

        def root(i: int) -> int:
            while block_of_group[i] != i:
                i = block_of_group[i]
            return i

        for i, outers in self._outer_of.items():
            for j in outers:
                block_of_group[root(i)] = root(j)
        blocks: dict[Any, list[dict]] = {}
        for n in self.nodes:
            gi = next((k for k, g in enumerate(self.groups) if any(m is n for m in g["members"])), None)
            blocks.setdefault(("g", root(gi)) if gi is not None else ("n", n["id"]), []).append(n)
        # inside each block: columns keep their order, nothing overlaps
        for members in blocks.values():
            placed: list[dict] = []
            for n in sorted(members, key=lambda n: (n["pos"][1], n["pos"][0])):
                x0, x1 = n["pos"][0], n["pos"][0] + n["size"][0]
                y = n["pos"][1]
                for p in placed:
                    if p["pos"][0] < x1 + self.GAP and x0 < p["pos"][0] + p["size"][0] + self.GAP:
                        y = max(y, p["pos"][1] + p["size"][1] + self.GAP + self.TITLE_H)
                n["pos"][1] = y
                placed.append(n)
        # blocks: move down below the blocks above them
        def block_box(key, members) -> list[float]:
            if key[0] == "n":
                return self._box(members, 0)
            gboxes = self._group_boxes()
            mine = [gboxes[k] for k in range(len(self.groups)) if root(k) == key[1]]
            x0, y0 = min(b[0] for b in mine), min(b[1] for b in mine)
            x1, y1 = max(b[0] + b[2] for b in mine), max(b[1] + b[3] for b in mine)
            return [x0, y0, x1 - x0, y1 - y0]

        done: list[list[float]] = []
        order = sorted(blocks.items(), key=lambda kv: block_box(*kv)[1])
        for key, members in order:
            box = block_box(key, members)
            shift = 0.0
            moved = True
            while moved:
                moved = False
                for other in done:
                    cand = [box[0], box[1] + shift, box[2], box[3]]
                    if self._overlap(cand, other, self.BLOCK_GAP):
                        shift = other[1] + other[3] + self.BLOCK_GAP - box[1]
                        moved = True
            for n in members:
                n["pos"][1] += shift
            done.append([box[0], box[1] + shift, box[2], box[3]])
        return self._group_boxes()

    def to_json(self) -> dict[str, Any]:
        boxes = self._layout()
        groups = [{"id": grp["id"], "title": grp["title"], "bounding": box, "color": grp["color"], "font_size": 24,
                   "flags": {}} for grp, box in zip(self.groups, boxes)]
        for n in self.nodes:
            for o in n["outputs"]:
                o["links"] = o["links"] or None
        left = min([n["pos"][0] for n in self.nodes] + [g["bounding"][0] for g in groups])
        top = min([n["pos"][1] - self.TITLE_H for n in self.nodes] + [g["bounding"][1] for g in groups])
        offset = [40 - left, 40 - top]  # the whole graph starts in view at the top left
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": groups, "config": {}, "extra": {"ds": {"scale": 0.6, "offset": offset}},
                "version": 0.4}


# --------------------------------------------------------------------------------------------
# Shared pieces


def loaders(g: Graph, files: dict[str, tuple[str, str]], clip_type: str, title: str, x: float = 0,
            y: float = 0) -> tuple[dict, dict, dict]:
    """Load Diffusion Model, the text encoder loader (Dual CLIP for two files) and Load VAE for the
    files of one model (name -> (url, folder)), each naming its downloads in ``properties.models``."""
    folder = {f: [n for n, (_, d) in files.items() if d == f] for f in ("diffusion_models", "text_encoders", "vae")}
    (unet_name,), encoders, (vae_name,) = folder["diffusion_models"], folder["text_encoders"], folder["vae"]
    unet = g.add("UNETLoader", (x, y), unet_name=unet_name, weight_dtype="default")
    if len(encoders) == 2:
        clip = g.add("DualCLIPLoader", (x, y + 130), clip_name1=encoders[0], clip_name2=encoders[1], type=clip_type)
    else:
        clip = g.add("CLIPLoader", (x, y + 130), clip_name=encoders[0], type=clip_type)
    vae = g.add("VAELoader", (x, y + 300), vae_name=vae_name)
    for node, names in ((unet, [unet_name]), (clip, encoders), (vae, [vae_name])):
        node["properties"]["models"] = [{"name": n, "url": files[n][0], "directory": files[n][1]} for n in names]
    g.group(title, [unet, clip, vae])
    return unet, clip, vae


def flux_loaders(g: Graph, x: float = 0, y: float = 0) -> tuple[dict, dict, dict]:
    return loaders(g, MODEL_FILES, "flux", "FLUX.1-dev loaders", x, y)


def face_and_caption(g: Graph, clip: dict, x: float, y: float, photo: str = PHOTO) -> tuple[dict, dict, dict]:
    img = g.add("LoadImage", (x, y), title="Photo of the person", image=photo)
    aug = g.add("MetaLoRAFaceAugment", (x, y + 360), detector="auto", seed=0, bucket_resolution=512)
    cap = g.add("CLIPTextEncode", (x + 360, y + 360), title="training caption", text=TRAIN_CAPTION)
    g.link(img, "IMAGE", aug, "image")
    g.link(clip, "CLIP", cap, "clip")
    return img, aug, cap


def sample_branch(g: Graph, model: dict, clip: dict, vae: dict, prompt: str, x: float, y: float, seed: int = 42,
                  save: str | None = None, title: str | None = None) -> tuple[list[dict], dict]:
    """CLIPTextEncode -> FluxGuidance 3.5 -> KSampler (30 steps, cfg 1, euler/simple) -> VAEDecode [-> SaveImage].

    Returns (the nodes, the VAEDecode node)."""
    enc = g.add("CLIPTextEncode", (x, y), title=title, node_width=400, text=prompt)
    guid = g.add("FluxGuidance", (x + 430, y), guidance=3.5)
    neg = g.add("ConditioningZeroOut", (x + 430, y + 110))
    lat = g.add("EmptySD3LatentImage", (x + 430, y + 200), width=1024, height=1024, batch_size=1)
    ks = g.add("KSampler", (x + 780, y), seed=seed, steps=30, cfg=1.0, sampler_name="euler", scheduler="simple",
               denoise=1.0)
    dec = g.add("VAEDecode", (x + 1130, y))
    g.link(clip, "CLIP", enc, "clip")
    g.link(enc, 0, guid, "conditioning")
    g.link(enc, 0, neg, "conditioning")
    g.link(model, 0, ks, "model")
    g.link(guid, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    nodes = [enc, guid, neg, lat, ks, dec]
    if save is not None:
        out = g.add("SaveImage", (x + 1130, y + 110), filename_prefix=save)
        g.link(dec, 0, out, "images")
        nodes.append(out)
    return nodes, dec


def batch(g: Graph, images: list[dict], x: float, y: float) -> dict:
    """Chains ImageBatch nodes into one batch (same order); returns the node giving the batch."""
    cur = images[0]
    for k, img in enumerate(images[1:]):
        b = g.add("ImageBatch", (x, y + 90 * k), node_width=220)
        g.link(cur, 0, b, "image1")
        g.link(img, 0, b, "image2")
        cur = b
    return cur


def train(g: Graph, unet: dict, vae: dict, aug: dict, cap: dict, x: float, y: float, prior: dict | None,
          steps: int, rank: int = 1, title: str | None = None) -> dict:
    node = g.add("MetaLoRATrain", (x, y), title=title, node_width=340, steps=steps, rank=rank, learning_rate=4e-4, seed=0,
                 resolution=512, gradient_checkpointing=True, preview_every=25, force_retrain=False)
    g.link(unet, "MODEL", node, "model")
    g.link(vae, "VAE", node, "vae")
    g.link(aug, "crops", node, "crops")
    g.link(cap, 0, node, "positive")
    if prior is not None:
        g.link(prior, 0, node, "prior")
    return node


def meta_lora_branch(g: Graph, unet: dict, clip: dict, vae: dict, prior_name: str = PRIOR_FILE) -> tuple[dict, ...]:
    """Prior loader, photo, face augment, caption, Meta-LoRA train (375 steps, rank 1) and apply.

    Returns (prior, image, augment, caption, train, apply) nodes."""
    prior = g.add("MetaLoRAPriorLoader", (0, 470), prior_name=prior_name)
    img, aug, cap = face_and_caption(g, clip, 380, 0)
    tr = train(g, unet, vae, aug, cap, 760, 0, prior, steps=375, rank=1, title="Meta-LoRA Train (375 steps, rank 1)")
    return prior, img, aug, cap, tr, apply(g, unet, tr, 1140, 0)


def apply(g: Graph, unet: dict, lora: dict, x: float, y: float) -> dict:
    node = g.add("MetaLoRAApply", (x, y), strength=1.0)
    g.link(unet, "MODEL", node, "model")
    g.link(lora, "meta_lora", node, "meta_lora")
    return node


# --------------------------------------------------------------------------------------------
# The workflows


def personalize(g: Graph, unet: dict, clip: dict, vae: dict, prior_name: str, lora_prefix: str) -> dict:
    """Group 1 of a one-click graph: Meta-LoRA from one photo, saved, with its loss curve and crops
    shown. Returns the apply node."""
    prior, img, aug, cap, tr, ap = meta_lora_branch(g, unet, clip, vae, prior_name)
    save = g.add("MetaLoRASave", (1140, 160), subfolder="metalora", filename_prefix=lora_prefix)
    loss = g.add("PreviewImage", (1140, 330), title="loss curve")
    crops = g.add("PreviewImage", (760, 520), title="training crops")
    g.link(tr, "meta_lora", save, "meta_lora")
    g.link(tr, "loss_curve", loss, "images")
    g.link(aug, "preview", crops, "images")
    g.group("1. Personalize: photo -> crops -> Meta-LoRA (Stage-2)", [prior, img, aug, cap, tr, ap, save, loss, crops],
            color="#8A8")
    return ap


def one_click(info: dict) -> dict:
    g = Graph(info)
    g.note(DOWNLOAD_NOTE, (-520, -40), (480, 560), title="Read me: downloads")
    unet, clip, vae = flux_loaders(g, 0, 0)
    ap = personalize(g, unet, clip, vae, PRIOR_FILE, "person")
    prompts = (T1, T1B, T2, T3[0])
    branch_nodes = []
    for k, p in enumerate(prompts):
        nodes, _ = sample_branch(g, ap, clip, vae, p, 0, 900 + 330 * k, save=f"metalora/prompt_{k + 1}",
                                 title=f"prompt {k + 1}")
        branch_nodes += nodes
    g.group("2. Generate: FLUX.1-dev, 30 steps, guidance 3.5, 1024x1024 (one branch per prompt; edit or copy them)",
            branch_nodes, color="#A88")
    g.note("Several prompts = several branches (ComfyUI samples one prompt per KSampler). To add a prompt, copy a "
           "branch (prompt -> FluxGuidance -> KSampler -> VAE Decode -> Save Image) and connect its model to "
           "'Meta-LoRA Apply'. Training is not repeated: its result is cached.", (1550, 900), (420, 180),
           title="Prompts")
    return g.to_json()


def comparison(info: dict) -> dict:
    g = Graph(info)
    methods = ("FLUX.1-dev (no ID)", "LoRA rank 1, 625 steps, no augmentation", "LoRA + augmentation, 625 steps",
               "Meta-LoRA, 375 steps")
    prompts = (T1, T1B, T2, T2B)
    g.note("Paper Fig. 4/7/8: one photo, one seed, four methods, prompts from Tables 1-2.\n\n"
           "Rows: FLUX without identity; plain LoRA (no prior) at 625 steps; LoRA + the paper's face "
           "augmentation at 625 steps; Meta-LoRA (prior) at 375 steps. Rank 1 everywhere, seed 42 for "
           "every image.\n\nThe grid (last node) is labelled with methods and prompts.\n\n"
           "'no augmentation': the plain-LoRA row gets its own Face Augment node set to augmentation "
           "'none' (the photo itself, one training image, no flips).\n\n"
           "Downloads: see the one-click workflow's note.", (-520, -40), (480, 520), title="Read me")
    unet, clip, vae = flux_loaders(g, 0, 0)
    prior = g.add("MetaLoRAPriorLoader", (0, 470), prior_name=PRIOR_FILE)
    img, aug, cap = face_and_caption(g, clip, 380, 0)
    aug_plain = g.add("MetaLoRAFaceAugment", (380, 560), title="Face Augment (plain-LoRA row)", detector="auto",
                      seed=0, bucket_resolution=512, augmentation="none")
    g.link(img, "IMAGE", aug_plain, "image")
    t_plain = train(g, unet, vae, aug_plain, cap, 760, 0, None, steps=625, title="LoRA (no prior), 625 steps")
    t_aug = train(g, unet, vae, aug, cap, 760, 420, None, steps=625, title="LoRA + augmentation, 625 steps")
    t_meta = train(g, unet, vae, aug, cap, 760, 840, prior, steps=375, title="Meta-LoRA, 375 steps")
    models = [unet] + [apply(g, unet, t, 1140, 420 * k) for k, t in enumerate((t_plain, t_aug, t_meta))]
    g.group("Training (one photo, rank 1)", [prior, img, aug, aug_plain, cap, t_plain, t_aug, t_meta, *models[1:]],
            color="#8A8")
    rows = []
    for r, (name, model) in enumerate(zip(methods, models)):
        y = 1400 + r * (4 * 330 + 120)
        decs, members = [], []
        for c, p in enumerate(prompts):
            nodes, dec = sample_branch(g, model, clip, vae, p, 0, y + 330 * c, title=f"{name[:24]}: prompt {c + 1}")
            decs.append(dec)
            members += nodes
        row = batch(g, decs, 1500, y)
        members += [n for n in g.nodes[-(len(decs) - 1):]]
        g.group(f"Row {r + 1}: {name}", members, color="#A88")
        rows.append(row)
    grid = g.add("MetaLoRAImageGrid", (1800, 1400), node_width=400, row_labels="\n".join(methods),
                 column_labels="\n".join(prompts), tile=384)
    for r, row in enumerate(rows):
        g.link(row, 0, grid, f"row_{r + 1}")
    out = g.add("SaveImage", (1800, 1900), filename_prefix="metalora/comparison_grid")
    g.link(grid, 0, out, "images")
    g.group("Labelled grid", [grid, out], color="#88A")
    return g.to_json()


def scored_cell(g: Graph, model: dict, clip: dict, vae: dict, img: dict, held: dict, x: float, y: float,
                prefix: str, label: str) -> list[dict]:
    """Table-3 prompts through one model, then CLIP-T and R-FaceSim of the generations."""
    decs, members = [], []
    for k, p in enumerate(T3):
        nodes, dec = sample_branch(g, model, clip, vae, p, x, y + 330 * k, save=f"{prefix}/{k}", title=f"{label}: prompt {k}")
        decs.append(dec)
        members += nodes
    gens = batch(g, decs, x + 1500, y)
    members += g.nodes[-(len(decs) - 1):]
    ct = g.add("MetaLoRAClipT", (x + 1760, y), node_width=380, prompts="\n".join(T3), clip_model=CLIP_T_FOLDER)
    fs = g.add("MetaLoRAFaceSim", (x + 1760, y + 400), node_width=380, detector="auto", embedder="auto",
               missing_face="exclude")
    g.link(gens, 0, ct, "images")
    g.link(gens, 0, fs, "generated")
    g.link(held, 0, fs, "held_out")
    g.link(img, "IMAGE", fs, "reference")
    members += [ct, fs]
    g.group(label, members, color="#A88")
    return members


def held_out_photos(g: Graph, x: float, y: float) -> dict:
    loads = [g.add("LoadImage", (x + 330 * k, y), title=f"held-out photo {k + 1}", image=name)
             for k, name in enumerate(HELD_OUT)]
    b = batch(g, loads, x + 330 * len(loads), y)
    g.group("Held-out photos of the same person (NOT the training photo)", [*loads, b], color="#88A")
    return b


def sweep(info: dict) -> dict:
    g = Graph(info)
    g.note("Paper Fig. 3/5/6: rank x iterations sweep, one cell per queue.\n\n"
           "This graph is ONE cell (rank r, checkpoint s) for both methods: Meta-LoRA and LoRA + augmentation "
           "(no prior), each scored with CLIP-T and R-FaceSim on Table-3 prompts. The full sweep is ranks "
           "{1, 2, 4, 8, 16} x checkpoints {250, 375, 500, 625, 750}: 25 queues of this graph. Script it:\n\n"
           "for r in 1 2 4 8 16; do for s in 250 375 500 625 750; do\n"
           "  python tools/to_api.py example_workflows/03_rank_iterations_sweep.json --server http://127.0.0.1:8188 \\\n"
           "    --set 'Meta-LoRA.rank='$r --set 'Meta-LoRA.steps='$s \\\n"
           "    --set 'LoRA + aug.rank='$r \\\n"
           "    --set 'LoRA + aug.steps='$s\n"
           "done; done\n\n"
           "Images are saved as sweep/<method>/<prompt index>.png per queue (set the prefixes per cell, or "
           "rename); 'metalora eval' then writes scores.csv, summary.json and the R-FaceSim vs CLIP-T scatter "
           "over all cells. Every train node is an independent run (training restarts per checkpoint).\n\n"
           f"CLIP-T needs a transformers CLIP ViT-B/32 folder in models/metalora_clip/{CLIP_T_FOLDER}.",
           (-520, -40), (480, 660), title="Read me: the sweep")
    unet, clip, vae = flux_loaders(g, 0, 0)
    prior = g.add("MetaLoRAPriorLoader", (0, 470), prior_name=PRIOR_FILE)
    img, aug, cap = face_and_caption(g, clip, 380, 0)
    t_meta = train(g, unet, vae, aug, cap, 760, 0, prior, steps=375, rank=1, title="Meta-LoRA")
    t_aug = train(g, unet, vae, aug, cap, 760, 420, None, steps=375, rank=1, title="LoRA + aug")
    a_meta, a_aug = apply(g, unet, t_meta, 1140, 0), apply(g, unet, t_aug, 1140, 420)
    g.group("Training: set rank and steps on both train nodes (one sweep cell)",
            [prior, img, aug, cap, t_meta, t_aug, a_meta, a_aug], color="#8A8")
    held = held_out_photos(g, 1500, 0)
    scored_cell(g, a_meta, clip, vae, img, held, 0, 1000, "sweep/meta_lora/person", "Meta-LoRA cell")
    scored_cell(g, a_aug, clip, vae, img, held, 0, 1000 + 4 * 330 + 200, "sweep/lora_aug/person", "LoRA + aug cell")
    return g.to_json()


def r_face_sim_eval(info: dict) -> dict:
    g = Graph(info)
    g.note("R-FaceSim (Algorithm 3) with Table-3 prompts, one identity per queue.\n\n"
           "Per identity: ONE reference photo trains the Meta-LoRA; every other photo of that person is a "
           "held-out test photo; each generated face is compared with every held-out face (mean cosine), "
           "then averaged over prompts. Faces not found are listed in the table, never dropped silently.\n\n"
           "Over a folder of identities: queue this graph once per person (change the three Load Image nodes "
           "and the Save Image prefixes to <person>/<prompt index>), e.g. with tools/to_api.py --set. "
           "Then 'metalora eval --identities IDENTITIES --generated output/rfacesim ...' computes the mean "
           "over identities (the paper's number) and writes scores.csv / summary.json.\n\n"
           "Shown here: 4 of the 10 Table-3 prompts; copy a branch for the rest ([man/woman] expanded for the "
           "person's class).", (-520, -40), (480, 560), title="Read me: R-FaceSim")
    unet, clip, vae = flux_loaders(g, 0, 0)
    prior, img, aug, cap, tr, ap = meta_lora_branch(g, unet, clip, vae)
    g.group("Personalize on the reference photo", [prior, img, aug, cap, tr, ap], color="#8A8")
    held = held_out_photos(g, 1500, 0)
    scored_cell(g, ap, clip, vae, img, held, 0, 1000, "rfacesim/person", "Generate Table-3 prompts and score")
    return g.to_json()


def pulid(info: dict) -> dict:
    g = Graph(info)
    g.note("PuLID-FLUX vs Meta-LoRA on the same photo, prompts and seed.\n\n"
           "NEEDS the third-party pack ComfyUI-PuLID-Flux (github.com/balazik/ComfyUI-PuLID-Flux; install it "
           "with ComfyUI-Manager 'Install missing custom nodes') and its models: models/pulid/"
           "pulid_flux_v0.9.0.safetensors, EVA-CLIP and insightface antelopev2 (see that pack's README). "
           "Those nodes are not part of this pack.\n\nBoth rows are scored with R-FaceSim against held-out "
           "photos and shown in one labelled grid.", (-520, -40), (480, 420), title="Read me: PuLID-FLUX")
    unet, clip, vae = flux_loaders(g, 0, 0)
    prior, img, aug, cap, tr, ap = meta_lora_branch(g, unet, clip, vae)
    g.group("Meta-LoRA", [prior, img, aug, cap, tr, ap], color="#8A8")
    pl = g.add("PulidFluxModelLoader", (380, 560), pulid_file="pulid_flux_v0.9.0.safetensors")
    ev = g.add("PulidFluxEvaClipLoader", (380, 680))
    fa = g.add("PulidFluxInsightFaceLoader", (380, 760), provider="CPU")
    apl = g.add("ApplyPulidFlux", (760, 560), weight=1.0, start_at=0.0, end_at=1.0)
    g.link(unet, "MODEL", apl, "model")
    g.link(pl, 0, apl, "pulid_flux")
    g.link(ev, 0, apl, "eva_clip")
    g.link(fa, 0, apl, "face_analysis")
    g.link(img, "IMAGE", apl, "image")
    g.group("PuLID-FLUX (third-party pack: ComfyUI-PuLID-Flux)", [pl, ev, fa, apl], color="#A8A")
    held = held_out_photos(g, 1500, 0)
    prompts = (T1, T2, T3[0])
    rows = []
    for r, (name, model) in enumerate((("PuLID-FLUX", apl), ("Meta-LoRA", ap))):
        y = 1000 + r * (len(prompts) * 330 + 200)
        decs, members = [], []
        for c, p in enumerate(prompts):
            nodes, dec = sample_branch(g, model, clip, vae, p, 0, y + 330 * c, title=f"{name}: prompt {c + 1}")
            decs.append(dec)
            members += nodes
        row = batch(g, decs, 1500, y)
        members += g.nodes[-(len(decs) - 1):]
        fs = g.add("MetaLoRAFaceSim", (1760, y), node_width=380, detector="auto", embedder="auto", missing_face="exclude")
        g.link(row, 0, fs, "generated")
        g.link(held, 0, fs, "held_out")
        g.link(img, "IMAGE", fs, "reference")
        g.group(f"{name}: prompts from Tables 1-3, scored", [*members, fs], color="#A88")
        rows.append(row)
    grid = g.add("MetaLoRAImageGrid", (2200, 1000), node_width=400, row_labels="PuLID-FLUX\nMeta-LoRA",
                 column_labels="\n".join(prompts), tile=384)
    g.link(rows[0], 0, grid, "row_1")
    g.link(rows[1], 0, grid, "row_2")
    out = g.add("SaveImage", (2200, 1500), filename_prefix="metalora/pulid_comparison")
    g.link(grid, 0, out, "images")
    return g.to_json()


def _generate_group(g: Graph, title: str, shared: list[dict], branches: list[list[dict]], note: str) -> None:
    g.group(title, [*shared, *(n for b in branches for n in b)], color="#A88")
    g.note(note, (1550, 900), (420, 180), title="Prompts")


def klein_one_click(info: dict) -> dict:
    """The one-click graph on FLUX.2 Klein 4B, sampled as ComfyUI's Klein 4B (distilled) template:
    CLIPTextEncode -> CFGGuider (cfg 1, zeroed negative) -> SamplerCustomAdvanced with RandomNoise,
    KSamplerSelect euler, Flux2Scheduler (4 steps) and EmptyFlux2LatentImage, shared by the prompts."""
    g = Graph(info)
    g.note(KLEIN_NOTE, (-520, -40), (480, 560), title="Read me: downloads")
    unet, clip, vae = loaders(g, KLEIN_FILES, "flux2", "FLUX.2 Klein 4B loaders")
    ap = personalize(g, unet, clip, vae, KLEIN_PRIOR, "person_klein")
    noise = g.add("RandomNoise", (0, 900), noise_seed=42)
    sampler = g.add("KSamplerSelect", (330, 900), sampler_name="euler")
    sigmas = g.add("Flux2Scheduler", (660, 900), steps=4, width=1024, height=1024)
    latent = g.add("EmptyFlux2LatentImage", (990, 900), width=1024, height=1024, batch_size=1)
    branches = []
    for k, prompt in enumerate((T1, T1B, T2, T3[0])):
        x, y = 0, 1120 + 330 * k
        enc = g.add("CLIPTextEncode", (x, y), title=f"prompt {k + 1}", node_width=400, text=prompt)
        neg = g.add("ConditioningZeroOut", (x + 430, y + 140))
        guider = g.add("CFGGuider", (x + 430, y), cfg=1.0)
        run = g.add("SamplerCustomAdvanced", (x + 780, y))
        dec = g.add("VAEDecode", (x + 1130, y))
        out = g.add("SaveImage", (x + 1130, y + 110), filename_prefix=f"metalora/klein_prompt_{k + 1}")
        g.link(clip, "CLIP", enc, "clip")
        g.link(enc, 0, neg, "conditioning")
        g.link(ap, 0, guider, "model")
        g.link(enc, 0, guider, "positive")
        g.link(neg, 0, guider, "negative")
        for src, name in ((noise, "noise"), (guider, "guider"), (sampler, "sampler"), (sigmas, "sigmas"),
                          (latent, "latent_image")):
            g.link(src, 0, run, name)
        g.link(run, 0, dec, "samples")
        g.link(vae, "VAE", dec, "vae")
        g.link(dec, 0, out, "images")
        branches.append([enc, neg, guider, run, dec, out])
    _generate_group(g, "2. Generate: FLUX.2 Klein 4B, 4 steps, cfg 1, 1024x1024 (one branch per prompt; edit or "
                    "copy them)", [noise, sampler, sigmas, latent], branches,
                    "Several prompts = several branches. To add a prompt, copy a branch (prompt -> CFG Guider -> "
                    "SamplerCustomAdvanced -> VAE Decode -> Save Image); noise, sampler, schedule and latent are "
                    "shared (set the size on both Flux2Scheduler and the latent). Training is not repeated: its "
                    "result is cached.")
    return g.to_json()


def zimage_one_click(info: dict) -> dict:
    """The one-click graph on Z-Image Turbo, sampled as ComfyUI's Z-Image Turbo template:
    ModelSamplingAuraFlow (shift 3) on the personalized model, KSampler 8 steps, cfg 1,
    res_multistep / simple, a zeroed negative, EmptySD3LatentImage."""
    g = Graph(info)
    g.note(ZIMAGE_NOTE, (-520, -40), (480, 560), title="Read me: downloads")
    unet, clip, vae = loaders(g, ZIMAGE_FILES, "lumina2", "Z-Image Turbo loaders")
    ap = personalize(g, unet, clip, vae, ZIMAGE_PRIOR, "person_zimage")
    shift = g.add("ModelSamplingAuraFlow", (0, 900), shift=3.0)
    latent = g.add("EmptySD3LatentImage", (330, 900), width=1024, height=1024, batch_size=1)
    g.link(ap, 0, shift, "model")
    branches = []
    for k, prompt in enumerate((T1, T1B, T2, T3[0])):
        x, y = 0, 1120 + 330 * k
        enc = g.add("CLIPTextEncode", (x, y), title=f"prompt {k + 1}", node_width=400, text=prompt)
        neg = g.add("ConditioningZeroOut", (x + 430, y))
        ks = g.add("KSampler", (x + 780, y), seed=42, steps=8, cfg=1.0, sampler_name="res_multistep",
                   scheduler="simple", denoise=1.0)
        dec = g.add("VAEDecode", (x + 1130, y))
        out = g.add("SaveImage", (x + 1130, y + 110), filename_prefix=f"metalora/zimage_prompt_{k + 1}")
        g.link(clip, "CLIP", enc, "clip")
        g.link(enc, 0, neg, "conditioning")
        g.link(shift, 0, ks, "model")
        g.link(enc, 0, ks, "positive")
        g.link(neg, 0, ks, "negative")
        g.link(latent, 0, ks, "latent_image")
        g.link(ks, 0, dec, "samples")
        g.link(vae, "VAE", dec, "vae")
        g.link(dec, 0, out, "images")
        branches.append([enc, neg, ks, dec, out])
    _generate_group(g, "2. Generate: Z-Image Turbo, shift 3, 8 steps, cfg 1, 1024x1024 (one branch per prompt; edit "
                    "or copy them)", [shift, latent], branches,
                    "Several prompts = several branches (ComfyUI samples one prompt per KSampler). To add a prompt, "
                    "copy a branch (prompt -> KSampler -> VAE Decode -> Save Image) and connect its model to "
                    "'ModelSamplingAuraFlow'. Training is not repeated: its result is cached.")
    return g.to_json()


WORKFLOW_BUILDERS = {
    "01_one_click_meta_lora.json": one_click,
    "02_comparison_fig4.json": comparison,
    "03_rank_iterations_sweep.json": sweep,
    "04_r_face_sim_evaluation.json": r_face_sim_eval,
    "05_pulid_flux_comparison.json": pulid,
    "06_one_click_flux2_klein.json": klein_one_click,
    "07_one_click_z_image_turbo.json": zimage_one_click,
}


def build_all() -> dict[str, str]:
    """File name -> JSON text of every workflow."""
    info = load_schemas()
    return {name: json.dumps(make(info), indent=1) + "\n" for name, make in WORKFLOW_BUILDERS.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Regenerate example_workflows/*.json")
    ap.add_argument("--check", action="store_true", help="only compare with the shipped files")
    args = ap.parse_args(argv)
    stale = []
    for name, text in build_all().items():
        path = WORKFLOWS / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date (run tools/build_workflows.py): {stale}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
