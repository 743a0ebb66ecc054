"""Pod's checkout on an encoding host (roles/xapi_encodage_pod), run in check mode on this
machine against git repositories in a temporary directory: what the role would check out,
refuse, say and record, read from the run itself.

Stand-ins: Pod's user is this machine's root (su to root), its repository a bare repository
here (an absolute path, as the lab's), its record a file of the test's. Check mode: the
role reads for real (git rev-parse, ls-remote, the record) and changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="Pod's user stand-in is root (su)")

GOOD = {
    "xapi_broker_password": "a-good-broker-password",
    "xapi_broker_producer_password": "a-good-producer-password",
    "xapi_lrs_url": "https://lrs.example.org/xAPI/statements/",
    "xapi_lrs_login": "pod",
    "xapi_lrs_password": "a-good-lrs-password",
    "ansible_become_method": "su",
    "ansible_python_interpreter": "/usr/bin/python3",
    "xapi_encodage_pod_user": "root",
    "xapi_encodage_pod_group": "root",
    "xapi_encodage_pod_home": "/root",
}


# The task that rewrites the record, reported changed (its diff, if any, in between).
UPDATED = (
    r"TASK \[xapi_encodage_pod : Update the record of Pod's checkout\](?:(?!TASK \[).)*? changed: "
)


def git(*args: str, cwd: Path | None = None) -> str:
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.org",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.org",
    )
    return subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


class Site:
    """Pod's repository (4.1.0 and 4.4.0, annotated tags) and paths of a host."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        work = tmp / "upstream"
        work.mkdir()
        git("init", "-q", "-b", "main", cwd=work)
        self.commits: dict[str, str] = {}
        for version in ("4.1.0", "4.4.0"):
            (work / "VERSION").write_text(version + "\n")
            git("add", "VERSION", cwd=work)
            git("commit", "-q", "-m", version, cwd=work)
            git("tag", "-a", "-m", version, version, cwd=work)
            self.commits[version] = git("rev-parse", "HEAD", cwd=work)
        self.work = work
        self.repo = tmp / "Esup-Pod.git"
        git("clone", "-q", "--bare", str(work), str(self.repo))
        self.dir = tmp / "podv4"
        self.venv = tmp / "venv"
        self.record = tmp / "xapi_pod.fact"

    def branch_named_like(self, version: str) -> str:
        """A branch of the release's name, at another commit (someone who can push)."""
        git("checkout", "-q", "-b", "other", self.commits["4.1.0"], cwd=self.work)
        (self.work / "evil.py").write_text("print('not Pod')\n")
        git("add", "evil.py", cwd=self.work)
        git("commit", "-q", "-m", "not the release", cwd=self.work)
        commit = git("rev-parse", "HEAD", cwd=self.work)
        git("push", "-q", str(self.repo), f"HEAD:refs/heads/{version}", cwd=self.work)
        return commit

    def checkout_at(self, version: str) -> None:
        git("clone", "-q", str(self.repo), str(self.dir))
        git("checkout", "-q", version, cwd=self.dir)

    def run(self, **values: object) -> tuple[int, str]:
        """The role in check mode; its exit status and output on one line."""
        extra = self.tmp / "vars.json"
        extra.write_text(
            json.dumps(
                {
                    **GOOD,
                    "xapi_encodage_pod_repo": str(self.repo),
                    "xapi_encodage_pod_dir": str(self.dir),
                    "xapi_encodage_pod_venv": str(self.venv),
                    "xapi_encodage_pod_fact_file": str(self.record),
                    **values,
                }
            )
        )
        inventory = self.tmp / "hosts.yml"
        inventory.write_text(
            "all:\n  vars:\n    ansible_connection: local\n  children:\n"
            + "".join(
                f"    {group}:\n      hosts:\n        localhost:\n"
                for group in ("pod_frontal", "pod_encodage", "xapi_broker")
            )
        )
        playbook = self.tmp / "pod.yml"
        playbook.write_text(
            json.dumps([{"hosts": "localhost", "become": True, "roles": ["xapi_encodage_pod"]}])
        )
        env = dict(
            os.environ,
            ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"),
            ANSIBLE_ROLES_PATH=str(ROOT / "roles"),
            ANSIBLE_NOCOLOR="1",
        )
        result = subprocess.run(
            [
                "ansible-playbook",
                "-i",
                str(inventory),
                "--check",
                "--diff",
                "-e",
                f"@{extra}",
                str(playbook),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=False,
        )
        output = result.stdout + result.stderr
        return result.returncode, re.sub(r"\s+", " ", output.replace("''", "'"))


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_an_upgrade_to_a_name_that_is_also_a_branch_is_refused(site: Site) -> None:
    """Review M5: a branch pushed with the release's name was what git checked out (and what
    the record then stored), and it turned the moved-tag check off."""
    site.checkout_at("4.1.0")
    branch = site.branch_named_like("4.4.0")
    site.record.write_text(
        json.dumps({"version": "4.1.0", "repo": str(site.repo), "commit": site.commits["4.1.0"]})
    )
    code, said = site.run(
        xapi_encodage_pod_upgrade_from="4.1.0", xapi_encodage_pod_upgrade_to="4.4.0"
    )
    assert code != 0, said[-3000:]
    assert (
        'Refused: xapi_encodage_pod_upgrade_to ("4.4.0") names both a tag (refs/tags/4.4.0, '
        f"commit {site.commits['4.4.0']}) and a branch (refs/heads/4.4.0, commit {branch})"
    ) in said, said[-3000:]
    assert not re.search(r"TASK \[xapi_encodage_pod : Clone Pod[^*]*\*+ (changed|ok)", said)
    assert git("rev-parse", "HEAD", cwd=site.dir) == site.commits["4.1.0"]


def test_a_fresh_host_is_not_cloned_at_a_name_that_is_also_a_branch(site: Site) -> None:
    """`git clone --branch 4.4.0` takes the branch too."""
    site.branch_named_like("4.4.0")
    code, said = site.run(xapi_encodage_pod_version="4.4.0")
    assert code != 0, said[-3000:]
    assert 'Refused: xapi_encodage_pod_version ("4.4.0") names both a tag' in said, said[-3000:]
    assert not site.dir.exists()


def test_the_upgrade_checks_out_the_tags_commit(site: Site) -> None:
    """Without a branch of that name the upgrade goes on, to the tag's commit (peeled)."""
    site.checkout_at("4.1.0")
    code, said = site.run(
        xapi_encodage_pod_upgrade_from="4.1.0", xapi_encodage_pod_upgrade_to="4.4.0"
    )
    assert code == 0, said[-3000:]
    assert (
        f"Pod upgraded on localhost: 4.1.0 ({site.commits['4.1.0']}) -> 4.4.0 "
        f"({site.commits['4.4.0']})"
    ) in said, said[-3000:]


def test_a_pending_record_for_another_commit_is_ignored_and_said(site: Site) -> None:
    """The stale record of issue 32's review: requirements left pending for 4.4.0's commit,
    then Pod's checkout rolled back by hand to 4.1.0. The entry counts only while the
    checkout is at that commit: the run says it is ignored and drops it (check mode: the
    record's task would change), and nothing is to be installed in Pod's venv."""
    site.checkout_at("4.1.0")
    site.record.write_text(
        json.dumps(
            {
                "version": "4.4.0",
                "repo": str(site.repo),
                "commit": site.commits["4.4.0"],
                "pending_requirements": site.commits["4.4.0"],
            }
        )
    )
    code, said = site.run()
    assert code == 0, said[-3000:]
    assert (
        f"Ignored: {site.record} on localhost says that the requirements of commit "
        f"{site.commits['4.4.0']} are still to be installed in Pod's venv, but Pod's checkout "
        f"{site.dir} is at {site.commits['4.1.0']}"
    ) in said, said[-3000:]
    assert re.search(UPDATED, said)
    assert "does not have the requirements of its checkout yet" not in said


def test_a_credential_in_the_repository_url_is_refused(site: Site) -> None:
    """Session 5's review, L4: a token in the URL (masked in the output since review L7) was
    still on git's command line (ls-remote, clone, fetch: /proc/PID/cmdline, which every
    local user reads) and in the checkout's .git/config. Refused before any change, masked,
    saying what to do instead; the login name alone of an ssh URL is no credential."""
    site.checkout_at("4.1.0")
    token = "glpat-s3cr3t-t0ken"
    for repo, shown in (
        (f"https://{token}@git.example.org/pod/Esup-Pod.git", "https://***@"),
        (f"ssh://git:{token}@git.example.org/pod/Esup-Pod.git", "ssh://***@"),
    ):
        code, said = site.run(xapi_encodage_pod_repo=repo)
        assert code != 0, said[-3000:]
        assert token not in said, said[-3000:]
        assert (
            f'xapi_encodage_pod_repo ("{shown}git.example.org/pod/Esup-Pod.git") holds a '
            "credential (user:token@ or a password)"
        ) in said, said[-3000:]
        assert "an ssh deploy key of root" in said
        assert "git config --global credential.helper store" in said
        assert f"git -C {site.dir} remote set-url origin URL" in said
        assert "changed=0" in said
    code, said = site.run(xapi_encodage_pod_repo="ssh://git@git.example.org/pod/Esup-Pod.git")
    assert code == 0, said[-3000:]


def test_a_token_an_earlier_release_recorded_is_masked(site: Site) -> None:
    """Review L7: an earlier release wrote https://user:token@host/... whole to the
    world-readable record. A run that checks nothing out rewrites it masked, without a diff
    (its old side would print the token)."""
    site.checkout_at("4.1.0")
    token = "glpat-s3cr3t-t0ken"
    repo = f"https://deploy:{token}@git.example.org/pod/Esup-Pod.git"
    site.record.write_text(
        json.dumps({"version": "4.1.0", "repo": repo, "commit": site.commits["4.1.0"]})
    )
    code, said = site.run()
    assert code == 0, said[-3000:]
    assert token not in said, said[-3000:]
    assert re.search(UPDATED, said)


@pytest.fixture
def pod_account() -> Iterator[str]:
    """An existing Pod user as a site made it: its own home and primary group."""
    name = f"xapi-pod-{os.getpid()}"
    home = ["--create-home", "--home-dir", f"/srv/{name}"]
    subprocess.run(["useradd", "--system", "--user-group", *home, name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", "--remove", name], check=True, capture_output=True)
        subprocess.run(["groupdel", name], check=False, capture_output=True)


def test_an_existing_pod_account_keeps_its_home_and_group(site: Site, pod_account: str) -> None:
    """Review L9 (first point): on an existing account the role still set the home
    (usermod -d, the default /home/pod) and the primary group. Both are left as the site
    made them, as the shell is: the account's task changes nothing."""
    site.checkout_at("4.1.0")
    _, said = site.run(xapi_encodage_pod_user=pod_account)
    assert re.search(r"TASK \[xapi_encodage_pod : Create Pod's user\] \*+ ok: ", said), said[-3000:]
