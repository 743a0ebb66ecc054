"""The changelog (antsibull-changelog, docs/releasing.md): its fragments and release file
lint clean, CHANGELOG.md is what changelogs/changelog.yaml generates, and every change landed on
main since the last release (a merged branch, or a commit made on main) that changes what
operators run comes with a fragment.

The fragment rule reads the git history: CI runs on a full clone (a shallow one fails here,
saying so, rather than passing unchecked).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHANGELOGS = ROOT / "changelogs"
FRAGMENTS = "changelogs/fragments/"
#: What operators run: a commit changing any of it adds or edits a fragment.
WATCHED = (
    "roles/",
    "playbooks/",
    "plugins/",
    "site.yml",
    "xapi_worker/src/",
    "xapi_worker/pyproject.toml",
    "xapi_worker/constraints.txt",
    "xapi_worker/requirements",
    "prometheus/",
    "meta/",
    "galaxy.yml",
)
#: The keys a fragment may use (the helpers' brief and docs/releasing.md name the first five).
KEYS = {
    "breaking_changes",
    "major_changes",
    "minor_changes",
    "bugfixes",
    "security_fixes",
    "deprecated_features",
    "removed_features",
    "known_issues",
    "release_summary",
    "trivial",
}


def _antsibull(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # the tools venv's (tools/requirements.txt), beside the Python running the tests
    beside = Path(sys.executable).parent / "antsibull-changelog"
    exe = str(beside) if beside.exists() else shutil.which("antsibull-changelog")
    if exe is None:
        pytest.fail("antsibull-changelog missing: pip install -r tools/requirements.txt")
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def test_config_sections_hold_the_fragment_keys() -> None:
    config = yaml.safe_load((CHANGELOGS / "config.yaml").read_text())
    sections = {name for name, _ in config["sections"]}
    assert {"breaking_changes", "major_changes", "minor_changes", "bugfixes"} <= sections
    assert "security_fixes" in sections
    assert KEYS <= sections | {config["prelude_section_name"], config["trivial_section_name"]}


def test_antsibull_changelog_lint() -> None:
    proc = _antsibull("lint", cwd=ROOT)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_release_is_galaxy_version() -> None:
    """galaxy.yml's version is the changelog's newest release (docs/releasing.md)."""
    galaxy = yaml.safe_load((ROOT / "galaxy.yml").read_text())
    releases = yaml.safe_load((CHANGELOGS / "changelog.yaml").read_text())["releases"]
    assert galaxy["version"] in releases


def test_changelog_md_is_generated(tmp_path: Path) -> None:
    """CHANGELOG.md is what `antsibull-changelog generate` writes from changelog.yaml."""
    for name in ("galaxy.yml", "CHANGELOG.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "plugins", tmp_path / "plugins")
    (tmp_path / "changelogs").mkdir()
    for name in ("config.yaml", "changelog.yaml"):
        shutil.copy(CHANGELOGS / name, tmp_path / "changelogs" / name)
    proc = _antsibull("generate", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "CHANGELOG.md").read_text() == (ROOT / "CHANGELOG.md").read_text(), (
        "CHANGELOG.md is stale: antsibull-changelog generate"
    )


def test_fragments_use_known_keys() -> None:
    for path in sorted((CHANGELOGS / "fragments").glob("*.y*ml")):
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict) and data, path.name
        assert set(data) <= KEYS, f"{path.name}: {sorted(set(data) - KEYS)}"


def _changed(commit: str) -> list[str]:
    """What a change on main changed: a merge against its first parent (the whole branch it
    brought), a plain commit against its parent."""
    return _git("diff", "--name-only", "--diff-filter=AMRD", f"{commit}^1", commit).split()


def unreleased_without_fragment() -> list[str]:
    """Changes on main (its first-parent history: each merged branch counts as one change,
    each commit made on main as one) after the last release (the last commit that changed
    changelogs/changelog.yaml) that change WATCHED files other than docs, and no fragment."""
    if _git("rev-parse", "--is-shallow-repository").strip() == "true":
        pytest.fail("shallow clone: the fragment check needs the history (git fetch --unshallow)")
    release = _git("log", "-1", "--format=%H", "--", "changelogs/changelog.yaml").strip()
    assert release, "no release commit (changelogs/changelog.yaml never committed)"
    missing = []
    for commit in _git("rev-list", "--first-parent", f"{release}..HEAD").split():
        files = _changed(commit)
        watched = [
            f for f in files if (f == "site.yml" or f.startswith(WATCHED)) and not f.endswith(".md")
        ]
        # a fragment added or edited (a deleted one is no fragment of this change)
        kept = set(_git("diff", "--name-only", "--diff-filter=AMR", f"{commit}^1", commit).split())
        fragments = [
            f
            for f in files
            if f in kept and f.startswith(FRAGMENTS) and f.endswith((".yml", ".yaml"))
        ]
        released = "changelogs/changelog.yaml" in files
        if watched and not fragments and not released:
            subject = _git("log", "-1", "--format=%h %s", commit).strip()
            missing.append(f"{subject[:100]} (changes {watched[0]})")
    return missing


def test_every_change_since_the_release_has_a_fragment() -> None:
    missing = unreleased_without_fragment()
    assert not missing, (
        "commits changing roles/, playbooks/, site.yml or xapi_worker/src without a fragment "
        "in changelogs/fragments/ (docs/releasing.md):\n" + "\n".join(missing)
    )
