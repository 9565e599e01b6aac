"""Face detection time and crops per photo on the registry-shipped sample photos.

    .venv/bin/python bench/face_detection.py [--detector auto] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from metalora_core.faces import AugmentConfig, get_detector, load_image, make_crops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from sample_photos import sample_photo  # noqa: E402  (the tests' photo fetcher, not installed)

PHOTOS = ("obama", "obama2", "obama3", "biden", "astronaut", "t1", "coffee")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    det = get_detector(args.detector)
    rows = []
    for name in PHOTOS:
        image = load_image(sample_photo(name))
        det.detect(image)  # warm-up
        times, faces = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            faces = det.detect(image)
            times.append(time.perf_counter() - t)
        crops = make_crops(image, faces[0], AugmentConfig(), torch.Generator().manual_seed(0)) if faces else []
        rows.append({"photo": name, "size": list(image.size), "faces": len(faces), "crops": len(crops),
                     "detect_ms_median": round(1000 * statistics.median(times), 1)})
    print(json.dumps({"detector": det.name, "repeats": args.repeats, "photos": rows}, indent=2))


if __name__ == "__main__":
    main()
