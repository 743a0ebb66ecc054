"""check_xapi in the form roles/xapi_ops ships it: the launcher (roles/xapi_ops/files/
check_xapi) and, beside it in ``check_xapi.lib/``, the worker package's modules the role
lists (``xapi_ops_check_modules``, roles/xapi_ops/vars/main.yml). Run with the system's
Python, isolated: what runs in the tests is what runs on a frontal."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles" / "xapi_ops"
SOURCE = REPO / "xapi_worker" / "src"


def shipped_modules() -> list[str]:
    """``xapi_ops_check_modules`` as the role's vars list it (one path per item)."""
    text = (ROLE / "vars" / "main.yml").read_text()
    block = re.search(r"^xapi_ops_check_modules:\n((?:  - .+\n)+)", text, re.MULTILINE)
    assert block is not None, "xapi_ops_check_modules not found in roles/xapi_ops/vars/main.yml"
    return [line.removeprefix("  - ").strip() for line in block.group(1).splitlines()]


def ship(dest: Path) -> Path:
    """The launcher and its modules laid out in ``dest`` as the role installs them in the
    plugin directory; the launcher's path."""
    dest.mkdir(parents=True, exist_ok=True)
    for module in shipped_modules():
        target = dest / "check_xapi.lib" / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SOURCE / module, target)
    launcher = dest / "check_xapi"
    shutil.copyfile(ROLE / "files" / "check_xapi", launcher)
    launcher.chmod(0o755)
    return launcher
