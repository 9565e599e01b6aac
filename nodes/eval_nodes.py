"""Evaluation nodes (V3 API): CLIP-T, FaceSim / R-FaceSim (Algorithm 3) and a labelled image grid.

Thin: ``metalora_core.eval.metrics`` computes the scores, ``metalora_core.draw.eval_figures`` and
``metalora_core.draw.sheets`` draw the pictures.
"""
from __future__ import annotations

import math
import os

import torch
from comfy_api.latest import io

from ..metalora_core.draw.sheets import labelled_sheet
from ..metalora_core.eval.metrics import CLIP_T_MODEL_HINT, MISSING_FACE_POLICIES, clip_t, face_sim, r_face_sim
from ..metalora_core.faces import DETECTOR_NAMES, EMBEDDER_NAMES, get_detector, get_embedder
from ..metalora_core.draw.sheets import draw_labelled_grid
from ..metalora_core.data.prompts import parse_prompts
from .folders import CLIP_FOLDER, folder_list, insightface_root
from .images import image_to_pils, pils_to_image

GRID_ROWS = 6  # image inputs of MetaLoRAImageGrid (one row each)


def clip_model_names() -> list[str]:
    """Sub-folders of the registered CLIP folders that hold a ``config.json`` (model folders)."""
    names: list[str] = []
    for root in folder_list(CLIP_FOLDER):
        if os.path.isdir(root):
            names += [d for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, "config.json"))]
    return list(dict.fromkeys(names))


def clip_model_path(name: str) -> str:
    for root in folder_list(CLIP_FOLDER):
        path = os.path.join(root, name)
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    roots = ", ".join(folder_list(CLIP_FOLDER))
    raise FileNotFoundError(
        f"CLIP model folder {name!r} not found in {roots}; put a transformers CLIP ViT-B/32 folder there, e.g. "
        f"'hf download {CLIP_T_MODEL_HINT} --local-dir {os.path.join(roots.split(', ')[0], name)}'"
    )


def _nan(v: float | None) -> float:
    return math.nan if v is None else float(v)


class MetaLoRAClipT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAClipT", display_name="Meta-LoRA CLIP-T", category="MetaLoRA/eval",
            description="CLIP-T (prompt adherence): cosine of CLIP image and prompt embeddings, per image and mean.",
            inputs=[
                io.Image.Input("images", tooltip="Generated images (a batch), in prompt order."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="One prompt per line, one per image in batch order; a single line "
                                        "scores every image against it. Lines starting with '#' are ignored."),
                io.Combo.Input("clip_model", options=clip_model_names(),
                               tooltip="A transformers CLIP folder in models/metalora_clip (the paper: "
                                       f"{CLIP_T_MODEL_HINT}); never downloaded automatically."),
            ],
            outputs=[io.Float.Output(display_name="clip_t"), io.String.Output(display_name="table"),
                     io.Image.Output(display_name="annotated")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images: torch.Tensor, prompts: str, clip_model: str) -> io.NodeOutput:
        texts = parse_prompts(prompts)
        if not texts:
            raise ValueError("prompts is empty; give one prompt per line (or one line for every image)")
        pils = image_to_pils(images)
        result = clip_t(pils, texts, clip_model_path(clip_model))
        grid = labelled_sheet(pils, result.labels())
        table = result.table()
        return io.NodeOutput(result.mean, table, pils_to_image([grid]), ui={"text": [table]})


class MetaLoRAFaceSim(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAFaceSim", display_name="Meta-LoRA R-FaceSim / FaceSim", category="MetaLoRA/eval",
            description="Identity similarity of generated faces: R-FaceSim (Algorithm 3, against held-out photos) "
                        "and, with a reference photo, conventional FaceSim.",
            inputs=[
                io.Image.Input("generated", tooltip="Generated images of one person (a batch, one per prompt)."),
                io.Image.Input("held_out", tooltip="Real photos of the same person NOT used for training (a batch; "
                                                   "Image Batch center-crops them to one size)."),
                io.Combo.Input("detector", options=list(DETECTOR_NAMES), default="auto",
                               tooltip="Face detector; 'auto' uses insightface from models/insightface if present, "
                                       "else YuNet."),
                io.Combo.Input("embedder", options=list(EMBEDDER_NAMES), default="auto",
                               tooltip="Identity embedder; 'auto' uses insightface ArcFace if present, else SFace. "
                                       "Scores from different embedders are not comparable (the table names it)."),
                io.Combo.Input("missing_face", options=list(MISSING_FACE_POLICIES), default="exclude",
                               tooltip="Generated images without a face: 'exclude' leaves them out of the mean, "
                                       "'zero' counts them as 0. Either way the table lists them."),
                io.Image.Input("reference", optional=True,
                               tooltip="The photo used for training; when given, conventional FaceSim is computed too."),
            ],
            outputs=[io.Float.Output(display_name="r_face_sim"), io.Float.Output(display_name="face_sim"),
                     io.String.Output(display_name="table"), io.Image.Output(display_name="annotated")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, generated: torch.Tensor, held_out: torch.Tensor, detector: str, embedder: str,
                missing_face: str, reference: torch.Tensor | None = None) -> io.NodeOutput:
        det = get_detector(detector, insightface_root=insightface_root())
        emb = get_embedder(embedder, insightface_root=insightface_root())
        gens, tests = image_to_pils(generated), image_to_pils(held_out)
        refs = None if reference is None else {"person": image_to_pils(reference)[0]}
        res = r_face_sim({"person": gens}, {"person": tests}, det, emb, references=refs, missing_face=missing_face)
        table = res.table()
        if refs is not None:  # per-image FaceSim rows (same faces, the reference as target)
            table += "\n\n" + face_sim(gens, refs["person"], det, emb, missing_face=missing_face).table()
        else:
            table += "\n\nFaceSim: no reference photo connected (output is NaN)"
        labels = [f"gen {p.prompt_index}: " + (f"R {p.score:.3f}" if p.score is not None else p.status.replace("_", " "))
                  + ("" if p.face_sim is None else f" F {p.face_sim:.3f}") for p in res.pairs]
        labels += [f"held-out {t.index}" + ("" if t.faces_found else ": no face") for t in res.test_photos]
        boxes = [p.box for p in res.pairs] + [t.box for t in res.test_photos]
        grid = labelled_sheet(gens + tests, labels, boxes)
        return io.NodeOutput(_nan(res.score), _nan(res.face_sim), table, pils_to_image([grid]), ui={"text": [table]})


class MetaLoRAImageGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        rows = [io.Image.Input(f"row_{i}", optional=i > 1,
                               tooltip=f"Images of row {i} (a batch: one column per image), e.g. one method's "
                                       "outputs in prompt order.") for i in range(1, GRID_ROWS + 1)]
        return io.Schema(
            node_id="MetaLoRAImageGrid", display_name="Meta-LoRA Labelled Grid", category="MetaLoRA/eval",
            description="Comparison grid: one row per connected image batch, labels left of rows and above columns.",
            inputs=[
                *rows,
                io.String.Input("row_labels", multiline=True, default="",
                                tooltip="One label per row, one per line (e.g. the method names)."),
                io.String.Input("column_labels", multiline=True, default="",
                                tooltip="One label per column, one per line (e.g. the prompts)."),
                io.Int.Input("tile", default=384, min=64, max=2048, step=16,
                             tooltip="Each cell's bounding square in pixels."),
            ],
            outputs=[io.Image.Output(display_name="grid")],
        )

    @classmethod
    def execute(cls, row_labels: str, column_labels: str, tile: int, **rows: torch.Tensor) -> io.NodeOutput:
        batches = [rows[f"row_{i}"] for i in range(1, GRID_ROWS + 1) if rows.get(f"row_{i}") is not None]
        lines = lambda s: [ln.strip() for ln in s.splitlines() if ln.strip()]  # noqa: E731
        grid = draw_labelled_grid([image_to_pils(b) for b in batches], lines(row_labels), lines(column_labels), tile)
        return io.NodeOutput(pils_to_image([grid]))


EVAL_NODES: list[type[io.ComfyNode]] = [MetaLoRAClipT, MetaLoRAFaceSim, MetaLoRAImageGrid]
