"""argparse wiring for ``metalora crops`` (called by metalora_core.cli)."""

from __future__ import annotations

import argparse
import logging

from ..faces.names import DETECTOR_NAMES, OTHER_FACES


def _run(args: argparse.Namespace) -> str:
    from ..faces.run import run_crops
    from ..formats.outputs import remove_stale_crops
    from .checks import check_crops

    before = check_crops(args)  # refuses a used folder without --overwrite
    result = run_crops(
        args.image,
        args.out,
        detector=args.detector,
        seed=args.seed,
        face_index=args.face,
        others=args.other_faces,
        resolution=args.resolution,
        insightface_root=args.insightface_root,
    )
    gone = remove_stale_crops(args.out, before, [c["file"] for c in result["crops"]])
    if gone:
        logging.getLogger(__name__).info("removed %d crop file(s) of the earlier run that this run did not "
                                         "write again: %s", len(gone), ", ".join(gone))
    return str(result["out_dir"])  # the command's output (printed by the CLI): where the crops are


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``crops IMAGE --out DIR [--detector NAME] [--seed N]`` to a CLI's subparsers.

    The parser's ``func`` default is a callable ``(args) -> output folder`` (the CLI prints it).
    """
    p = subparsers.add_parser(
        "crops",
        help="detect the face in a photo and write the paper's augmented crops",
        description="Writes crop PNGs, faces.png, contact_sheet.png and crops.json into --out.",
    )
    p.add_argument("image", help="photo of the person (the largest face is used unless --face says otherwise)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--detector", default="auto", choices=DETECTOR_NAMES, help="face detector backend")
    p.add_argument("--seed", type=int, default=0, help="seed of the random flips")
    p.add_argument("--face", type=int, default=None, help="face index when there are several (0 = largest)")
    p.add_argument("--other-faces", default="blur", choices=OTHER_FACES,
                   help="crops that show other people's faces: blur those faces (default), drop the crop, or keep it")
    p.add_argument("--resolution", type=int, default=512, help="crop side: each crop has about side^2 pixels")
    p.add_argument(
        "--insightface-root",
        default=None,
        help="folder holding models/buffalo_l or models/antelopev2 "
        "(default $METALORA_INSIGHTFACE_ROOT, then ~/.insightface)",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier crops run in --out (only those files)")
    p.set_defaults(func=_run)
    return p
