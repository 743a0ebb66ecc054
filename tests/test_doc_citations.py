"""Every citation of docs/upstream-facts.md names a section that the page has.

Code, tests and docs cite that page as "docs/upstream-facts.md §2.11" or link to one of its
anchors; a renumbered or renamed heading would leave them pointing at nothing. This reads
the headings, derives their numbers and GitHub anchors, and checks every tracked text file.

Run with the tools venv: `pytest tests/test_doc_citations.py`.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "upstream-facts.md"
HEADING = re.compile(r"^#{2,3} (\d+(?:\.\d+)?)\.? (.*)$", re.M)
SECTION_REF = re.compile(r"upstream-facts\.md §(\d+(?:\.\d+)?)")
ANCHOR_REF = re.compile(r"upstream-facts\.md#([a-z0-9-]+)")


def _anchor(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _sections() -> tuple[set[str], set[str]]:
    numbers, anchors = set(), set()
    for match in HEADING.finditer(DOC.read_text(encoding="utf-8")):
        number, title = match.groups()
        numbers.add(number)
        anchors.add(_anchor(f"{number} {title}"))
    return numbers, anchors


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    files = []
    for name in filter(None, out.split("\0")):
        path = REPO / name
        if path.is_symlink() or not path.is_file() or name.startswith("bench/results/"):
            continue
        files.append(path)
    return files


def test_headings_are_numbered() -> None:
    numbers, _ = _sections()
    assert {"1", "2", "2.11", "3", "5.3", "6", "7"} <= numbers


def test_every_citation_names_an_existing_section() -> None:
    numbers, anchors = _sections()
    bad = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for ref in SECTION_REF.findall(line):
                if ref not in numbers:
                    bad.append(f"{path.relative_to(REPO)}:{lineno}: §{ref}")
            for ref in ANCHOR_REF.findall(line):
                if ref not in anchors:
                    bad.append(f"{path.relative_to(REPO)}:{lineno}: #{ref}")
    assert not bad, "citations of docs/upstream-facts.md with no such section:\n" + "\n".join(bad)
