"""Pod's commit is recorded, and a tag that moved upstream stops the run before the checkout
(roles/xapi_encodage_pod/tasks/code.yml, security review point 10). Runs after test_sysv.py (file
order) and puts the tag back: later runs see the lab as prepare.yml made it.
"""

from __future__ import annotations

import json
import re

from test_sysv import run_role
from xapi_testsupport.pod_on_host import POD_DIR, as_pod_command

REPO = "/srv/git/Esup-Pod.git"
FACT = "/etc/ansible/facts.d/xapi_pod.fact"
TAG = "4.1.0"


def head(host) -> str:
    return host.check_output(as_pod_command(f"git -C {POD_DIR} rev-parse HEAD"))


def recorded(host) -> dict:
    fact = host.file(FACT)
    assert fact.user == "root" and fact.mode == 0o644
    return json.loads(fact.content_string)


def test_the_checked_out_commit_is_recorded(enc):
    tagged = enc.check_output(f"git -C {REPO} rev-parse {TAG}^{{commit}}")
    assert recorded(enc) == {"version": TAG, "repo": REPO, "commit": tagged}
    assert head(enc) == tagged


def test_a_moved_tag_is_refused_then_followed_only_when_allowed(enc1):
    old = enc1.check_output(f"git -C {REPO} rev-parse {TAG}^{{commit}}")
    # Upstream re-tags 4.1.0 onto a new commit (same tree: only the commit differs).
    new = enc1.check_output(
        f"git -C {REPO} -c user.name=lab -c user.email=lab@example.org "
        f"commit-tree {old}^{{tree}} -p {old} -m re-tagged"
    )
    assert enc1.run(f"git -C {REPO} tag -f {TAG} {new}").rc == 0
    try:
        refused = run_role("sysv-enc1")
        assert refused.returncode != 0
        assert f"Pod's tag {TAG} of {REPO} moved" in refused.stdout
        assert old in refused.stdout and new in refused.stdout
        assert head(enc1) == old and recorded(enc1)["commit"] == old

        allowed = run_role("sysv-enc1", "-e", "xapi_encodage_pod_allow_moved_tag=true")
        assert allowed.returncode == 0, allowed.stdout[-3000:]
        # The YAML callback wraps the message and doubles its quotes ('Pod''s tag').
        said = re.sub(r"\s+", " ", allowed.stdout.replace("''", "'"))
        assert re.search(rf"WARNING: Pod's tag {re.escape(TAG)} .*? moved", said), said[-3000:]
        assert head(enc1) == new and recorded(enc1)["commit"] == new
    finally:
        assert enc1.run(f"git -C {REPO} tag -f {TAG} {old}").rc == 0
    # Back to the lab's tag: the tag moved again (from the host's point of view), followed
    # once more when allowed; then a plain run has nothing to change.
    back = run_role("sysv-enc1", "-e", "xapi_encodage_pod_allow_moved_tag=true")
    assert back.returncode == 0, back.stdout[-3000:]
    assert head(enc1) == old and recorded(enc1)["commit"] == old
    again = run_role("sysv-enc1")
    assert again.returncode == 0, again.stdout[-3000:]
    assert re.search(r"sysv-enc1\s+:.*changed=0", again.stdout), again.stdout[-3000:]
