"""`site.yml --check --diff` on the converged hosts: nothing would change, nothing fails."""

from __future__ import annotations

import re


def test_check_diff_on_converged_hosts_changes_nothing(playbook):
    result = playbook("site.yml", "--check", "--diff")
    assert result.returncode == 0, result.stdout[-3000:]
    # Under molecule the output is coloured (ANSI escapes around the counts).
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    recap = re.findall(r"^(\S+)\s+: ok=\d+\s+changed=(\d+)", text, flags=re.MULTILINE)
    assert recap, result.stdout[-3000:]
    assert {host: int(changed) for host, changed in recap} == {host: 0 for host, _ in recap}
