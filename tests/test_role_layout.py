"""Every role has defaults, argument specs and a README naming each of its variables.

The standard the roles keep (README.md, "Layout"): an operator finds every variable of a
role in its README, and a bad value is refused by its argument specs before any change.
"""

from __future__ import annotations

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
