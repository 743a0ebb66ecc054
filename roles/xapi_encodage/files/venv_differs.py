"""What the worker's venv lacks: run by the venv's own Python, as root (the venv is root-owned).

argv: the hashed lock on the host, then NAME==VERSION of the worker's wheel. Prints JSON
{"lock": [the lock's pins not installed at their version], "worker": true when the wheel's
version is installed}. pip's own dry run answers the same question in ten times the time;
the role runs pip only for what this reports.
"""

import json
import re
import sys
from importlib import metadata

PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    lock, wheel = sys.argv[1], sys.argv[2]
    with open(lock, encoding="utf-8") as handle:
        pins = [match.groups() for match in map(PIN.match, handle) if match]
    name, version = wheel.split("==", 1)
    print(
        json.dumps(
            {
                "lock": [f"{n}=={v}" for n, v in pins if installed(n) != v],
                "worker": installed(name) == version,
            }
        )
    )


main()
