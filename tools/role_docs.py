#!/usr/bin/env python3
"""Write each role README's table of variables from its meta/argument_specs.yml.

Each variable is described once, in the role's ``meta/argument_specs.yml`` (what the run
checks before any change); its default is read from ``defaults/main.yml``. This writes the
table between the README's two markers::

    <!-- BEGIN role_docs: variables (python tools/role_docs.py writes this table) -->
    <!-- END role_docs: variables -->

    python tools/role_docs.py           # rewrite every stale table
    python tools/role_docs.py --check   # exit 1, naming each stale README

The output depends on those two files alone (no date, no machine): the same specs give the
same bytes. tests/test_role_docs.py fails when a README is stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python tools/role_docs.py"
BEGIN = f"<!-- BEGIN role_docs: variables ({COMMAND} writes this table) -->"
END = "<!-- END role_docs: variables -->"
#: A default longer than this, written out, is left to defaults/main.yml.
LONGEST_DEFAULT = 60


def _spec_options(role: Path) -> dict[str, dict[str, Any]]:
    """Every option of every entry point, in the order the specs give them (the first
    entry point that declares a variable describes it)."""
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text(encoding="utf-8"))
    options: dict[str, dict[str, Any]] = {}
    for entry in specs["argument_specs"].values():
        for name, option in (entry.get("options") or {}).items():
            options.setdefault(name, option)
    return options


def _cell(text: str) -> str:
    """Text for one table cell: one line, its pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _text(option: dict[str, Any]) -> str:
    description = option.get("description", "")
    if isinstance(description, list):
        description = " ".join(description)
    return str(description)


def _description(option: dict[str, Any]) -> str:
    """The option's description, then its keys' (a dict, or a list of dicts)."""
    parts = [_text(option)]
    for key, sub in (option.get("options") or {}).items():
        required = ", required" if sub.get("required") else ""
        parts.append(f"`{key}` ({_type(sub)}{required}): {_text(sub)}")
    return _cell(" ".join(parts))


def _type(option: dict[str, Any]) -> str:
    kind = str(option.get("type", "str"))
    if kind == "list" and "elements" in option:
        kind = f"list of {option['elements']}"
    choices = option.get("choices")
    if (
        choices
        and all(isinstance(c, int) for c in choices)
        and len(choices) > 3
        and (list(choices) == list(range(choices[0], choices[-1] + 1)))
    ):
        kind += f": {choices[0]} to {choices[-1]}"
    elif choices:
        kind += ": " + ", ".join(f"`{choice}`" for choice in choices)
    return _cell(kind)


def _default(name: str, option: dict[str, Any], defaults: dict[str, Any]) -> str:
    if option.get("required"):
        return "required"
    if name not in defaults:
        return "unset"
    value = defaults[name]
    if isinstance(value, str) and "{{" in value:
        written = " ".join(value.split())
        if len(written) > LONGEST_DEFAULT:
            return "computed: `defaults/main.yml`"
        return _cell(f"`{written}`")
    if value == "":
        return '`""`'
    written = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    written = written.removesuffix("...").strip()
    if len(written) > LONGEST_DEFAULT:
        return "see `defaults/main.yml`"
    return _cell(f"`{written}`")


def table(role: Path) -> str:
    """The README's table of the role's variables, markers included."""
    defaults_file = role / "defaults" / "main.yml"
    defaults = yaml.safe_load(defaults_file.read_text(encoding="utf-8")) or {}
    rows = [
        BEGIN,
        "",
        "| Variable | Type | Default | Meaning |",
        "|---|---|---|---|",
    ]
    for name, option in _spec_options(role).items():
        rows.append(
            f"| `{name}` | {_type(option)} | {_default(name, option, defaults)}"
            f" | {_description(option)} |"
        )
    rows += ["", END]
    return "\n".join(rows)


def render(role: Path) -> tuple[str, str]:
    """The README as it is, and as it should be."""
    readme = (role / "README.md").read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN.split(" (")[0]) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"{role / 'README.md'}: no {BEGIN!r} ... {END!r} markers")
    return readme, pattern.sub(lambda _: table(role), readme, count=1)


def roles() -> list[Path]:
    return sorted(
        p for p in (ROOT / "roles").iterdir() if (p / "meta/argument_specs.yml").is_file()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    stale = []
    for role in roles():
        current, wanted = render(role)
        if current == wanted:
            continue
        stale.append(role / "README.md")
        if not args.check:
            (role / "README.md").write_text(wanted, encoding="utf-8")
    for path in stale:
        verb = "is stale" if args.check else "rewritten"
        print(f"{path.relative_to(ROOT)} {verb}", file=sys.stderr)
    if args.check and stale:
        print(f"regenerate with: {COMMAND}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
