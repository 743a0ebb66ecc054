"""No command of the bundle may create, migrate or reset Pod's database or search index.

The encoding hosts share the frontal's database (Pod's "install without resetting the
database", docs/upstream-facts.md §1.3): `make install|createDB|upgrade|updatedb|migrate` and
`manage.py makemigrations|migrate|flush|loaddata|createsuperuser|create_pod_index` must never
appear in anything the bundle runs. This scans every YAML file, template and script of the
bundle (roles/, playbooks/, site.yml, lab/*.yml) and fails naming the file and the line.
Full-line comments are skipped: they run nothing. Ansible modules that would run the same
commands (community.general.make, community.general.django_manage) are caught too.

Run with the tools venv: `pytest tests/test_no_db_reset.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

MAKE_TARGETS = ("install", "createDB", "upgrade", "updatedb", "migrate")
MANAGE_COMMANDS = (
    "makemigrations",
    "migrate",
    "flush",
    "loaddata",
    "createsuperuser",
    "create_pod_index",
)

# `make [options or VAR=value ...] TARGET`, e.g. `make -C /usr/local/django_projects/podv4 install`.
MAKE_RE = re.compile(
    r"\bmake\s+(?:(?:-[A-Za-z]\s+(?!-)\S+|-\S+|\w+=\S+)\s+)*"
    rf"(?P<cmd>{'|'.join(MAKE_TARGETS)})\b"
)
# `[python] manage.py [--options ...] COMMAND` and `django-admin COMMAND`.
MANAGE_RE = re.compile(
    r"(?:\bmanage\.py['\"]?|\bdjango-admin)\s+(?:-\S+\s+)*"
    rf"(?P<cmd>{'|'.join(MANAGE_COMMANDS)})\b"
)
SUFFIXES = {".yml", ".yaml", ".j2", ".sh", ".py", ".cfg", ".service", ".conf"}


def bundle_files() -> list[Path]:
    files: set[Path] = set()
    for top in ("roles", "playbooks"):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                if path.suffix in SUFFIXES or "templates" in path.parts:
                    files.add(path)
    files.update(p for p in (ROOT / "lab").glob("*.yml") if p.is_file())
    files.update(p for p in (ROOT / "lab").glob("*.yaml") if p.is_file())
    if (ROOT / "site.yml").is_file():
        files.add(ROOT / "site.yml")
    return sorted(files)


def text_violations(path: Path, text: str) -> Iterator[str]:
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#") or stripped.startswith("{#"):
            continue
        for regex, what in ((MAKE_RE, "make"), (MANAGE_RE, "manage.py")):
            match = regex.search(line)
            if match:
                yield f"{path}:{number}: {what} {match.group('cmd')}: {stripped}"


def _walk(node: object) -> Iterator[dict]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def module_violations(path: Path, text: str) -> Iterator[str]:
    """Tasks calling the make or django_manage modules with a forbidden target/command."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return
    for document in documents:
        for mapping in _walk(document):
            for key, args in mapping.items():
                if not isinstance(args, dict):
                    continue
                name = str(key).rsplit(".", 1)[-1]
                if name == "make":
                    value = str(args.get("target", ""))
                    bad = [t for t in MAKE_TARGETS if re.search(rf"\b{t}\b", value)]
                elif name == "django_manage":
                    value = str(args.get("command", ""))
                    bad = [c for c in MANAGE_COMMANDS if re.search(rf"\b{c}\b", value)]
                else:
                    continue
                if bad:
                    line = _line_of(text, value)
                    yield f"{path}:{line}: module {key} runs {bad[0]}"


def _line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), start=1):
        if needle and needle in line:
            return number
    return 0


def scan(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    found = list(text_violations(path.relative_to(ROOT), text))
    if path.suffix in {".yml", ".yaml"}:
        found += module_violations(path.relative_to(ROOT), text)
    return found


def test_the_scan_covers_the_bundle() -> None:
    names = {str(p.relative_to(ROOT)) for p in bundle_files()}
    assert "site.yml" in names
    assert "roles/xapi_encodage/tasks/main.yml" in names
    assert "roles/xapi_encodage_pod/tasks/code.yml" in names
    assert any(n.startswith("playbooks/") for n in names)
    assert any(n.startswith("lab/") for n in names)


def test_no_database_or_index_resetting_command() -> None:
    violations = [v for path in bundle_files() for v in scan(path)]
    assert not violations, (
        "Commands that create, migrate or reset Pod's database or index (never on a host "
        "sharing the frontal's database):\n" + "\n".join(violations)
    )


@pytest.mark.parametrize(
    "line",
    [
        "cmd: make install",
        "  shell: cd /usr/local/django_projects/podv4 && make createDB",
        "cmd: make -C /usr/local/django_projects/podv4 upgrade",
        "make -j2 updatedb",
        "make DJANGO=1 migrate",
        "python3 manage.py migrate",
        "cmd: ./manage.py makemigrations pod",
        "python manage.py --settings=pod.settings flush --no-input",
        "manage.py loaddata initial_data",
        "manage.py createsuperuser",
        "python3 manage.py create_pod_index",
        "django-admin migrate",
    ],
)
def test_the_scanner_catches_resetting_commands(line: str) -> None:
    assert list(text_violations(Path("x.yml"), line)), line


@pytest.mark.parametrize(
    "line",
    [
        "# make install is never run here",
        "name: [git, python3-venv]",
        "cmd: make -C /tmp all",
        "python3 manage.py collectstatic",
        "pip install -r requirements-encode.txt",
        "celery -A pod.xapi.xapi_tasks worker -Q xapi",
    ],
)
def test_the_scanner_lets_harmless_lines_pass(line: str) -> None:
    assert not list(text_violations(Path("x.yml"), line)), line


def test_the_scanner_catches_modules() -> None:
    text = (
        "- hosts: all\n  tasks:\n"
        "    - community.general.make:\n        chdir: /srv\n        target: createDB\n"
        "    - community.general.django_manage:\n        command: migrate\n"
        "        project_path: /srv\n"
    )
    found = list(module_violations(Path("x.yml"), text))
    assert len(found) == 2, found
    assert found[0].startswith("x.yml:5:"), found
