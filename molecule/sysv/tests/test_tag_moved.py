"""Pod's commit is recorded when the role checks Pod out, a re-tag upstream never moves a
checkout, and an upgrade to a tag that moved stops the run before the checkout
(roles/xapi_encodage_pod/tasks/code.yml, security review point 10). Runs after test_sysv.py
(file order) and puts the tag back: later runs see the lab as prepare.yml made it.
"""

from __future__ import annotations

import json
import re

from test_sysv import run_role
from xapi_testsupport.pod_on_host import POD_DIR, as_pod_command

REPO = "/srv/git/Esup-Pod.git"
FACT = "/etc/ansible/facts.d/xapi_pod.fact"
# The release sysv-enc1, a host without Pod, got (the inventory's xapi_encodage_pod_version).
TAG = "4.4.0"


def head(host) -> str:
    return host.check_output(as_pod_command(f"git -C {POD_DIR} rev-parse HEAD"))


def recorded(host) -> dict:
    fact = host.file(FACT)
    assert fact.user == "root" and fact.mode == 0o644
    return json.loads(fact.content_string)


def upgrade(to_commit_from: str, *extra: str):
    return run_role(
        "sysv-enc1",
        "-e",
        f"xapi_encodage_pod_upgrade_from={to_commit_from}",
        "-e",
        f"xapi_encodage_pod_upgrade_to={TAG}",
        *extra,
    )


def test_the_fresh_checkout_is_recorded(enc1, enc2):
    """sysv-enc1 had no Pod: installed at the inventory's version, recorded. sysv-enc2 had
    Pod: its checkout is Pod's, left where it was, and not recorded."""
    tagged = enc1.check_output(f"git -C {REPO} rev-parse {TAG}^{{commit}}")
    assert recorded(enc1) == {"version": TAG, "repo": REPO, "commit": tagged}
    assert head(enc1) == tagged
    assert not enc2.file(FACT).exists


def test_a_moved_tag_never_moves_pod_and_stops_an_upgrade_unless_allowed(enc1):
    old = enc1.check_output(f"git -C {REPO} rev-parse {TAG}^{{commit}}")
    # Upstream re-tags 4.4.0 onto a new commit (same tree: only the commit differs).
    new = enc1.check_output(
        f"git -C {REPO} -c user.name=lab -c user.email=lab@example.org "
        f"commit-tree {old}^{{tree}} -p {old} -m re-tagged"
    )
    assert enc1.run(f"git -C {REPO} tag -f {TAG} {new}").rc == 0
    try:
        # Not asked to move: the checkout stays, whatever the tag says now.
        plain = run_role("sysv-enc1")
        assert plain.returncode == 0, plain.stdout[-3000:]
        assert re.search(r"sysv-enc1\s+:.*changed=0", plain.stdout), plain.stdout[-3000:]
        assert head(enc1) == old

        refused = upgrade(old)
        assert refused.returncode != 0
        assert f"Pod's tag {TAG} of {REPO} moved" in refused.stdout
        assert old in refused.stdout and new in refused.stdout
        assert head(enc1) == old and recorded(enc1)["commit"] == old

        allowed = upgrade(old, "-e", "xapi_encodage_pod_allow_moved_tag=true")
        assert allowed.returncode == 0, allowed.stdout[-3000:]
        # The YAML callback wraps the message and doubles its quotes ('Pod''s tag').
        said = re.sub(r"\s+", " ", allowed.stdout.replace("''", "'"))
        assert re.search(rf"WARNING: Pod's tag {re.escape(TAG)} .*? moved", said), said[-3000:]
        assert f"Pod upgraded on sysv-enc1: {old} ({old}) -> {TAG} ({new})" in said
        assert head(enc1) == new and recorded(enc1)["commit"] == new
    finally:
        assert enc1.run(f"git -C {REPO} tag -f {TAG} {old}").rc == 0
    # Back to the lab's tag: the tag moved again (from the host's point of view), followed
    # once more when allowed; then a plain run has nothing to change.
    back = upgrade(new, "-e", "xapi_encodage_pod_allow_moved_tag=true")
    assert back.returncode == 0, back.stdout[-3000:]
    assert head(enc1) == old and recorded(enc1)["commit"] == old
    again = run_role("sysv-enc1")
    assert again.returncode == 0, again.stdout[-3000:]
    assert re.search(r"sysv-enc1\s+:.*changed=0", again.stdout), again.stdout[-3000:]
