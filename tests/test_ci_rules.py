"""CI's rules in tests/conftest.py: with CI=true a skipped test, or a run with no test, fails the run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _pytest_in(folder: Path, files: dict[str, str], ci: bool) -> subprocess.CompletedProcess:
    for name in ("conftest.py", "sample_photos.py"):
        shutil.copyfile(TESTS / name, folder / name)
    for name, text in files.items():
        (folder / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "CI": "true" if ci else ""}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_a_skip_fails_in_ci(tmp_path):
    run = _pytest_in(tmp_path, {"test_one.py": "import pytest\n\ndef test_ok():\n    pass\n\n"
                                               "def test_skips():\n    pytest.skip('no thing')\n"}, ci=True)
    assert run.returncode == 1, run.stdout
    assert "CI: 1 test(s) skipped" in run.stdout and "1 passed, 1 skipped" in run.stdout


def test_no_test_fails_in_ci(tmp_path):
    run = _pytest_in(tmp_path, {"test_none.py": "X = 1\n"}, ci=True)
    assert run.returncode == 1 and "CI: no test ran" in run.stdout, run.stdout
