"""The MetaLoRA ComfyUI nodes (V3 API). Thin: they translate, ``training``/``metalora_core`` compute."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..metalora_core.faces import DETECTOR_NAMES
from ..metalora_core.faces.person import OTHER_FACES, labelled_preview, person_crops
from ..metalora_core.formats.prior import load_prior
from ..metalora_core.formats.store import check_save_name, save_lora_new
from ..metalora_core.lora.layers import DEFAULT_PRESET, PRESETS
from ..metalora_core.train.stage2 import Stage2Config
from . import interop, training
from .folders import PRIOR_FOLDER, insightface_root, prior_names
from .images import image_to_pils, pils_to_image

MetaLoRAPrior = io.Custom("META_LORA_PRIOR")
MetaLoRAType = io.Custom("META_LORA")
FaceCropsType = io.Custom("FACE_CROPS")


def _node_id(cls) -> str | None:
    hidden = getattr(cls, "hidden", None)
    return None if hidden is None else hidden.unique_id


def save_name_problem(subfolder, filename_prefix) -> str | None:
    """What Meta-LoRA Save would refuse in its name (``check_save_name``), or None. A value linked
    from another node is not known yet and is checked when Save runs."""
    if not isinstance(subfolder, str) and not isinstance(filename_prefix, str):
        return None
    try:
        check_save_name(subfolder if isinstance(subfolder, str) else "",
                        filename_prefix if isinstance(filename_prefix, str) else "person")
    except ValueError as e:
        return str(e)
    return None


def check_saves_of(prompt: dict | None, train_id: str | None) -> None:
    """Refuses to train when a Meta-LoRA Save fed by this Train node has a name it would refuse.

    ComfyUI still runs a prompt's other outputs (a loss-curve preview, sample images) when one
    output fails validation, so Save's own check at queue time alone would let training run for a
    LoRA that is never saved.
    """
    for node_id, node in (prompt or {}).items():
        inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
        link = inputs.get("meta_lora")
        if node.get("class_type") != "MetaLoRASave" or not (isinstance(link, list) and str(link[0]) == str(train_id)):
            continue
        problem = save_name_problem(inputs.get("subfolder"), inputs.get("filename_prefix"))
        if problem:
            raise ValueError(f"Meta-LoRA Save (node {node_id}) would refuse its name, so nothing was trained: {problem}")


_TRAINED = ", ".join(f.title for f in training.TRAINED_FAMILIES[:-1]) + " or " + training.TRAINED_FAMILIES[-1].title


class MetaLoRAPriorLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAPriorLoader", display_name="Meta-LoRA Prior Loader", category="MetaLoRA/loaders",
            description="Loads a Meta-Down prior (.safetensors) from models/meta_lora.",
            inputs=[io.Combo.Input("prior_name", options=prior_names(),
                                   tooltip="Prior file in models/meta_lora (or a meta_lora path from extra_model_paths.yaml).")],
            outputs=[MetaLoRAPrior.Output(display_name="prior")],
        )

    @classmethod
    def execute(cls, prior_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(PRIOR_FOLDER, prior_name)
        if not path.endswith(".safetensors"):
            raise ValueError(f"prior {prior_name!r}: only .safetensors files are read")
        try:
            prior = load_prior(path)
        except ValueError as e:  # the message names the file's full path
            raise ValueError(f"prior_name {prior_name!r}: {e}") from e
        return io.NodeOutput(prior)


AUGMENTATIONS = ("paper_grid", "none")


class MetaLoRAFaceAugment(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAFaceAugment", display_name="Meta-LoRA Face Augment", category="MetaLoRA/data",
            search_aliases=["face crops", "face dataset", "identity photos"],
            description="Detects the face and makes the paper's grid of face-centred training crops.",
            inputs=[
                io.Image.Input("image", tooltip="One photo of the person, a batch, or a list of photos of any sizes (e.g. Load Image from Folder): all one person."),
                io.Combo.Input("detector", options=list(DETECTOR_NAMES), default="auto",
                               tooltip="Face detector; 'auto' uses insightface from models/insightface if present, else YuNet."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Seed of the random horizontal flips (fixed: a new seed means new crops and a new training)."),
                io.Int.Input("bucket_resolution", default=512, min=64, max=2048, step=16,
                             tooltip="Each crop is cut at about this many pixels squared (512: 512x512 area). "
                                     "Meta-LoRA Train cuts them again from the photos if its resolution differs."),
                io.Combo.Input("augmentation", options=list(AUGMENTATIONS), default="paper_grid", optional=True,
                               tooltip="paper_grid: up to 25 face-centred crops (5 aspect ratios x 5 scales) with "
                                       "random flips, as the paper trains Meta-LoRA. none: each photo as it is, "
                                       "one crop per photo (the paper's plain-LoRA baseline)."),
                io.Int.Input("face_index", default=0, min=0, max=63, optional=True,
                             tooltip="Which face when a photo shows several: 0 the largest, 1 the next largest, ..."),
                io.Combo.Input("other_faces", options=list(OTHER_FACES), default="blur", optional=True,
                               tooltip="Crops that would show other people's faces: blur those faces, drop the "
                                       "crop, or keep it as it is. The preview says how many."),
            ],
            outputs=[FaceCropsType.Output(display_name="crops"), io.Image.Output(display_name="preview"),
                     io.String.Output(display_name="info", tooltip="Faces found and used, face sizes, warnings, "
                                                                   "crops blurred or dropped.")],
            hidden=[io.Hidden.unique_id],
            is_input_list=True,  # a list of photos (core folder loaders) of any sizes is one person
        )

    @classmethod
    def execute(cls, image, detector, seed, bucket_resolution, augmentation=("paper_grid",), face_index=(0,),
                other_faces=("blur",)) -> io.NodeOutput:
        one = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731 - widget lists hold one value
        photos = [pil for batch in (image if isinstance(image, (list, tuple)) else [image])
                  for pil in image_to_pils(batch)]
        crops, report = person_crops(photos, detector=one(detector), seed=one(seed), face_index=one(face_index),
                                     others=one(other_faces), resolution=one(bucket_resolution),
                                     insightface_root=insightface_root(), grid=one(augmentation) == "paper_grid")
        training.send_text(report.text(), _node_id(cls))
        return io.NodeOutput(crops, pils_to_image([labelled_preview(crops.crops, report)]), report.text())


class MetaLoRATrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRATrain", display_name="Meta-LoRA Train (Stage-2)", category="MetaLoRA/train",
            search_aliases=["train lora", "face lora", "identity lora", "personalize"],
            description="Trains LoRA-Mid/Up on the crops (plain LoRA without a prior) on a clone of the MODEL.",
            inputs=[
                io.Model.Input("model", tooltip=f"{_TRAINED} diffusion MODEL; it is cloned, never modified."),
                io.Vae.Input("vae", tooltip=f"The {_TRAINED} VAE that encodes the crops (and decodes previews)."),
                FaceCropsType.Input("crops", tooltip="Crops from Meta-LoRA Face Augment."),
                io.Conditioning.Input("positive", tooltip="The class caption encoded, e.g. 'a photo of a man'. Trains at "
                                                          "FLUX guidance 1.0 unless a FluxGuidance node sets it."),
                MetaLoRAPrior.Input("prior", optional=True,
                                    tooltip="Meta-Down prior; leave empty to train a plain LoRA (the paper's baseline)."),
                io.Int.Input("steps", default=375, min=1, max=100000, tooltip="Training steps (paper: 375)."),
                io.Int.Input("rank", default=1, min=1, max=256, tooltip="r2, the rank of the exported LoRA (paper: 1)."),
                io.Float.Input("learning_rate", default=4e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate (paper: 4e-4)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Seed for init, data order, noise and sigmas (fixed: a new seed trains again)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=16,
                             tooltip="Training resolution (about this many pixels squared per crop). Crops made at "
                                     "this bucket_resolution are used as they are; otherwise they are cut again from "
                                     "the photos at this size (one resize, same crops and flips) and the node says so."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="On: the same as memory 'low' (recompute each block in backward: much less activation memory, slower steps)."),
                io.Int.Input("preview_every", default=25, min=0, max=100000,
                             tooltip="Show a one-step denoised preview every N steps (0: never)."),
                io.Boolean.Input("force_retrain", default=False,
                                 tooltip="Ignore the disk cache of earlier identical runs and train again."),
                io.Combo.Input("memory", options=list(training.MEMORY_CHOICES), default="auto", optional=True,
                               tooltip="fast: fastest steps, most memory (FLUX at 512 px: about 8 GB of activations "
                                       "besides the weights). low: recompute every block (about a third slower, "
                                       "activations under 1 GB). auto: fast if it fits the card's free memory, else "
                                       "recompute only as many blocks as needed. gradient_checkpointing on means low."),
                io.Combo.Input("layers", options=list(PRESETS), default=DEFAULT_PRESET, optional=True,
                               tooltip="The Linears a plain LoRA (no prior) trains. all: every Linear of the blocks, "
                                       "modulation included (ai-toolkit's FLUX default, which the paper's "
                                       "implementation used); attn_mlp: without the modulation (about a fifth less "
                                       "activation memory at 512 px); attn: attention only. With a prior, the "
                                       "prior's own layers are trained whatever this says."),
            ],
            outputs=[MetaLoRAType.Output(display_name="meta_lora"), io.Image.Output(display_name="loss_curve"),
                     io.LoraModel.Output(display_name="lora", tooltip="The merged LoRA for core Save LoRA Weights / Load LoRA Model."),
                     io.LossMap.Output(display_name="loss_map", tooltip="Loss per step for core Plot Loss Graph.")],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, model, vae, crops, positive, steps: int, rank: int, learning_rate: float, seed: int,
                resolution: int, gradient_checkpointing: bool, preview_every: int, force_retrain: bool,
                prior=None, memory: str = "auto", layers: str = DEFAULT_PRESET) -> io.NodeOutput:
        check_saves_of(cls.hidden.prompt if getattr(cls, "hidden", None) else None, _node_id(cls))
        config = Stage2Config(steps=steps, rank=rank, lr=learning_rate, seed=seed, preset=layers)
        settings = training.TrainSettings(config, resolution=resolution, preview_every=preview_every,
                                          force_retrain=force_retrain,
                                          memory=training.memory_choice(memory, gradient_checkpointing))
        result = training.train_meta_lora(model, vae, prior, crops, positive, settings, node_id=_node_id(cls))
        curve = interop.labelled(training.loss_plot(result.losses), interop.run_summary(result, prior))
        return io.NodeOutput(result, curve, interop.lora_model(result), interop.loss_map(result.losses))


class MetaLoRAApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRAApply", display_name="Meta-LoRA Apply", category="MetaLoRA/apply",
            description="Applies a trained Meta-LoRA to a MODEL as standard LoRA weight patches.",
            inputs=[
                io.Model.Input("model", tooltip=f"{_TRAINED} MODEL to patch (a patched clone is returned)."),
                MetaLoRAType.Input("meta_lora", tooltip="Output of Meta-LoRA Train."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="LoRA strength, as in LoraLoaderModelOnly."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, meta_lora, strength: float) -> io.NodeOutput:
        if strength == 0:
            return io.NodeOutput(model)
        return io.NodeOutput(training.apply_meta_lora(model, meta_lora, strength))


class MetaLoRASave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MetaLoRASave", display_name="Meta-LoRA Save", category="MetaLoRA/save",
            description="Saves the merged rank-r2 LoRA to models/loras (numbered, never overwrites).",
            inputs=[
                MetaLoRAType.Input("meta_lora", tooltip="Output of Meta-LoRA Train."),
                io.String.Input("subfolder", default="metalora", tooltip="Folder inside models/loras ('' for the top)."),
                io.String.Input("filename_prefix", default="person",
                                tooltip="File name start; a number is appended (person_00001.safetensors). "
                                        "Folders may be part of it (people/ann), as in Save Image."),
            ],
            outputs=[io.String.Output(display_name="lora_name")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, subfolder=None, filename_prefix=None) -> bool | str:
        """ComfyUI's prompt validation: a name Save would refuse fails the prompt when it is queued."""
        return save_name_problem(subfolder, filename_prefix) or True

    @classmethod
    def execute(cls, meta_lora, subfolder: str, filename_prefix: str) -> io.NodeOutput:
        path = save_lora_new(meta_lora.adapters, training.lora_folder(), subfolder, filename_prefix,
                             family=meta_lora.family,
                             stems=interop.comfy_lora_stems(meta_lora.adapters, meta_lora.family),
                             **meta_lora.metadata, **{"modelspec.title": filename_prefix})
        training.refresh_lora_list()
        name = training.relative_lora_name(path)
        return io.NodeOutput(name, ui={"text": [name]})


NODES: list[type[io.ComfyNode]] = [MetaLoRAPriorLoader, MetaLoRAFaceAugment, MetaLoRATrain, MetaLoRAApply, MetaLoRASave]
