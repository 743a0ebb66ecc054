"""Every role has defaults, argument specs and a README naming each of its variables.

The standard the roles keep (README.md, "Layout"): an operator finds every variable of a
role in its README, and a bad value is refused by its argument specs before any change.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROLES = sorted(p for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir())


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_role_has_defaults_specs_and_a_readme_of_its_variables(role: Path) -> None:
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    readme = (role / "README.md").read_text()
    specified = {name for entry in specs.values() for name in (entry.get("options") or {})}
    assert not [name for name in defaults if not name.startswith(role.name + "_")], "prefix"
    assert not [name for name in defaults if f"`{name}`" not in readme], "README"
    assert not [name for name in defaults if name not in specified], "argument specs"


#: A role's file named in a comment or a doc: `tasks/x.yml` inside a role means its own,
#: `roles/<role>/tasks/x.yml` anywhere means that role's.
CITED_FILE = re.compile(
    r"(?<![\w/.-])(?:roles/(\w+)/)?"
    r"((?:tasks|templates|files|vars|defaults|handlers|meta)/[\w.@-]+\.(?:yml|j2|py|sh))\b"
)


def test_the_role_files_cited_exist() -> None:
    """A comment citing a file the role does not have sends the reader nowhere (issue #35:
    vars/main.yml cited tasks/spool.yml, which did not exist)."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    cited, missing = 0, []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".yml", ".md", ".j2", ".py", ".sh"} or not path.is_file():
            continue
        own = name.split("/")[1] if name.startswith("roles/") else None
        for match in CITED_FILE.finditer(path.read_text(encoding="utf-8", errors="replace")):
            role = match.group(1) or own
            if role is None:
                continue
            cited += 1
            if not (ROOT / "roles" / role / match.group(2)).exists():
                missing.append(f"{name}: {match.group(0)}")
    assert cited > 50, cited
    assert not missing, missing
