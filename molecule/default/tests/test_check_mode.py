"""`site.yml --check --diff` on the converged hosts: nothing would change, nothing fails."""

from __future__ import annotations

import re


def test_check_diff_on_converged_hosts_changes_nothing(playbook):
    result = playbook("site.yml", "--check", "--diff")
    assert result.returncode == 0, result.stdout[-3000:]
    recap = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", result.stdout, flags=re.MULTILINE)
    assert recap, result.stdout[-3000:]
    assert {host: int(changed) for host, changed in recap} == {host: 0 for host, _ in recap}
