"""One line naming the packages of an environment whose versions differ from the tested set.

Usage: python tools/untested_versions.py PYTHON [constraints.txt]
Prints ``packages at other versions than tested (constraints.txt): NAME X (tested Y), ...`` for
the environment of interpreter PYTHON, or says that every package is at its tested version.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tested_versions(constraints: Path) -> dict[str, str]:
    pins = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name)] = version.strip()
    return pins


def installed_versions(python: str) -> dict[str, str]:
    out = subprocess.run([python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                         check=True, capture_output=True, text=True).stdout
    return {canonical(p["name"]): p["version"] for p in json.loads(out)}


def newer_line(installed: dict[str, str], tested: dict[str, str], source: str) -> str:
    newer = [f"{name} {version} (tested {tested[name]})" for name, version in sorted(installed.items())
             if name in tested and version.split("+")[0] != tested[name].split("+")[0]]
    if not newer:
        return f"every package is at its tested version ({source}): the failure does not come from a release"
    return f"packages at other versions than tested ({source}): " + ", ".join(newer)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    constraints = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "constraints.txt"
    print(newer_line(installed_versions(argv[0]), tested_versions(constraints), constraints.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
