"""CI's rules in tests/conftest.py: with CI=true a skipped test, or a run with no test, fails the run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from references import load_script

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


# ------------------------------------------------------------------ pinned test environment, newest-versions run


def _untested_versions():
    return load_script("tools/untested_versions.py")


def test_the_newest_versions_run_names_the_package_that_moved():
    tool = _untested_versions()
    tested = tool.tested_versions(TESTS.parent / "constraints.txt")
    installed = {**tested, "opencv-python-headless": "5.1.0.95", "torch": "2.13.0+cpu", "not-pinned": "1.0"}
    line = tool.newer_line(installed, tested, "constraints.txt")
    assert line == ("packages at other versions than tested (constraints.txt): "
                    f"opencv-python-headless 5.1.0.95 (tested {tested['opencv-python-headless']})")
    assert "failure does not come from a release" in tool.newer_line(tested, tested, "constraints.txt")


def test_the_test_environment_installs_under_constraints_that_pin_every_direct_requirement():
    tool = _untested_versions()
    tested = tool.tested_versions(TESTS.parent / "constraints.txt")
    for line in (TESTS.parent / "requirements-dev.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            assert tested[tool.canonical(name)] == version, (name, version, tested.get(tool.canonical(name)))
    makefile = (TESTS.parent / "Makefile").read_text()
    assert "-r requirements-dev.txt -c constraints.txt" in makefile
    ci = (TESTS.parent / ".ci" / "run").read_text()
    assert "make test\n" in ci and "make test-newest\n" in ci
