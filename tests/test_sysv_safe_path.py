"""Review M4: under sysv, `celery multi` starts each node with `python -m celery`, which puts
the caller's working directory first on sys.path. The defaults file root sources (and whose
environment su passes on) sets PYTHONSAFEPATH and moves to /."""

from __future__ import annotations

from pathlib import Path

TEMPLATE = (
    Path(__file__).resolve().parents[1] / "roles/xapi_encodage/templates/celeryd-xapi.default.j2"
)


def sysv_part() -> list[str]:
    text = TEMPLATE.read_text()
    return text.split("{% if sysv %}", 1)[1].split("{% else %}", 1)[0].splitlines()


def test_the_init_script_starts_nodes_with_a_safe_path() -> None:
    lines = sysv_part()
    assert "export PYTHONSAFEPATH=1" in lines
    assert "cd /" in lines
