"""Each role README's table of variables is the one tools/role_docs.py writes from the role's
meta/argument_specs.yml and defaults/main.yml: a variable is described once, in the specs.

Run with the tools venv: `pytest tests/test_role_docs.py`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location("role_docs", ROOT / "tools" / "role_docs.py")
assert _SPEC and _SPEC.loader
role_docs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(role_docs)

ROLES = role_docs.roles()


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_readme_table_is_generated_from_the_specs(role: Path) -> None:
    current, wanted = role_docs.render(role)
    assert current == wanted, (
        f"{role.name}/README.md's table of variables is stale: "
        f"regenerate it with `{role_docs.COMMAND}`"
    )


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_variable_is_described(role: Path) -> None:
    blank = [
        name
        for name, option in role_docs._spec_options(role).items()
        if not role_docs._text(option).strip()
    ]
    assert not blank, f"{role.name}: no description in meta/argument_specs.yml for {blank}"


def test_the_table_is_the_same_twice() -> None:
    """Deterministic: the same files give the same bytes (no order of a set, no date)."""
    assert [role_docs.table(r) for r in ROLES] == [role_docs.table(r) for r in ROLES]
