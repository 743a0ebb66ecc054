"""The worker's unit sandbox on the encoding host (security review point 9): its exposure as
`systemd-analyze security` scores it, the directives systemd has loaded, and the IP allow
list at work (a transient unit under the worker's own IPAddressDeny=/IPAddressAllow= values
cannot reach an address outside the list, and can reach the LRS).

Run by molecule (verify), or against the lab:
    pytest molecule/default/tests/test_unit_hardening.py --lab
"""

from __future__ import annotations

import re
import shlex
import time

import pytest
from xapi_testsupport.polling import wait_until

NODE_UNIT = "celeryd-xapi@xapi.service"
GROUP_UNIT = "celeryd-xapi.service"
# Measured on the lab image (Debian 12, systemd 252) with the role's unit: 3.1 before the
# hardening, 1.1 after; the group unit 0.2 (roles/xapi_encodage README, "Sandbox").
NODE_MAX_EXPOSURE = 1.1
GROUP_MAX_EXPOSURE = 0.4
# Outside any allow list the role builds: TEST-NET-1 (RFC 5737), routed nowhere. Not the
# network's gateway: it is the lab's DNS server, which the list allows.
OUTSIDE = "192.0.2.1"
WORKER_ENV = "/etc/celeryd-xapi/worker.env"
BROKER_ENV = "/etc/celeryd-xapi/broker-xapi.env"

# One TCP connect: how it ended and how long it took. The filter refuses a connect at once
# with EPERM; an address merely unreachable times out or answers otherwise.
PROBE = """
import errno, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(3)
t = time.monotonic()
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    r = "connected"
except socket.timeout:
    r = "timeout"
except OSError as e:
    r = errno.errorcode.get(e.errno, str(e.errno))
print(r, round(time.monotonic() - t, 3))
"""


def show(host, unit: str, prop: str) -> str:
    return host.check_output(f"systemctl show -p {prop} --value {unit}").strip()


def exposure(host, unit: str) -> float:
    out = host.check_output(f"systemd-analyze security --no-pager {unit}")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
    assert match, out
    return float(match.group(1))


def test_node_unit_exposure(encodage):
    score = exposure(encodage, NODE_UNIT)
    print(f"\n{NODE_UNIT}: overall exposure {score} (at most {NODE_MAX_EXPOSURE})")
    assert score <= NODE_MAX_EXPOSURE


def test_group_unit_exposure(encodage):
    score = exposure(encodage, GROUP_UNIT)
    print(f"\n{GROUP_UNIT}: overall exposure {score} (at most {GROUP_MAX_EXPOSURE})")
    assert score <= GROUP_MAX_EXPOSURE
    # Sandboxed down to that, the group unit still starts (as the worker's user, no network).
    assert show(encodage, GROUP_UNIT, "ActiveState") == "active"


@pytest.mark.parametrize(
    ("prop", "expected"),
    [
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        ("RemoveIPC", "yes"),
        ("PrivateUsers", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("NoNewPrivileges", "yes"),
        # EPERM, as systemd shows it.
        ("SystemCallErrorNumber", "1"),
        ("UMask", "0077"),
        ("IPAddressDeny", "0.0.0.0/0 ::/0"),
    ],
)
def test_node_unit_directive_loaded(encodage, prop, expected):
    # Lists (IPAddressDeny) come in systemd's own order: compared as sets of words.
    assert sorted(show(encodage, NODE_UNIT, prop).split()) == sorted(expected.split())


def test_node_unit_system_call_filter(encodage):
    allowed = set(show(encodage, NODE_UNIT, "SystemCallFilter").split())
    # An allow list (@system-service) from which @privileged and @resources were taken out.
    assert {"read", "connect", "sendmsg"} <= allowed
    assert not allowed & {"setpriority", "setrlimit", "mount", "reboot", "setuid", "init_module"}


def resolved(host, name: str) -> set[str]:
    out = host.check_output(f"getent ahosts {shlex.quote(name)}")
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def peers(host) -> tuple[tuple[str, int], tuple[str, int]]:
    """(host, port) of the LRS and of the node's broker, from the worker's own settings.
    Only the host and port are taken out: the URLs hold the passwords."""
    lrs = re.search(
        r'^XAPI_LRS_URL="https?://([^/:"]+|\[[^]]+\])(?::(\d+))?',
        host.file(WORKER_ENV).content_string,
        re.M,
    )
    broker = re.search(
        r'^XAPI_CELERY_BROKER_URL="rediss?://[^@"]*@([^/:"]+|\[[^]]+\]):(\d+)',
        host.file(BROKER_ENV).content_string,
        re.M,
    )
    assert lrs and broker, "no LRS or broker URL in the worker's settings"
    lrs_port = int(lrs.group(2) or 80)
    return (lrs.group(1).strip("[]"), lrs_port), (broker.group(1).strip("[]"), int(broker.group(2)))


def allow_list(host) -> list[str]:
    return show(host, NODE_UNIT, "IPAddressAllow").split()


def test_allow_list_is_loopback_broker_and_lrs(encodage):
    allowed = allow_list(encodage)
    print(f"\nIPAddressAllow={' '.join(allowed)}")
    assert {"127.0.0.0/8", "::1/128"} <= set(allowed)
    hosts = {address.split("/")[0] for address in allowed}
    (lrs, _), (broker, _) = peers(encodage)
    assert resolved(encodage, broker) <= hosts, f"the broker host {broker} is not allowed"
    assert resolved(encodage, lrs) <= hosts, f"the LRS host {lrs} is not allowed"
    assert OUTSIDE not in hosts


def ip_filter_enforced(host) -> bool:
    """systemd filters IP traffic with cgroup BPF programs, on the unified hierarchy only
    (cgroup v2). Under cgroup v1 (this project's podman machine) it loads the directives
    and enforces nothing: measured, IPAddressDeny=any still lets a connect through."""
    return host.check_output("stat -fc %T /sys/fs/cgroup").strip() == "cgroup2fs"


def probe(host, target: str, port: int, filtered: bool) -> tuple[str, float]:
    """A connect from a transient unit run as pod; with ``filtered``, under the worker's
    own IP settings. systemd-run without --wait/--pipe: those need D-Bus, which the lab
    image has not; the result goes to a file."""
    name = f"xapi-ipprobe-{int(time.monotonic() * 1000)}"
    out = f"/run/{name}.out"
    props = ["-p", "User=pod", "-p", f"StandardOutput=file:{out}"]
    if filtered:
        props += [
            "-p",
            f"IPAddressDeny={show(host, NODE_UNIT, 'IPAddressDeny')}",
            "-p",
            f"IPAddressAllow={show(host, NODE_UNIT, 'IPAddressAllow')}",
        ]
    cmd = ["systemd-run", f"--unit={name}", "--collect", "--quiet", *props]
    cmd += ["/usr/bin/python3", "-c", PROBE, target, str(port)]
    host.check_output(shlex.join(cmd))
    assert wait_until(lambda: host.file(out).exists and host.file(out).size > 0, 15), name
    text = host.file(out).content_string.split()
    host.run(f"rm -f {out}")
    return text[0], float(text[1])


def test_ip_filter_blocks_outside_and_allows_the_lrs(encodage):
    if not ip_filter_enforced(encodage):
        pytest.skip(
            "systemd does not enforce IPAddressDeny= here (cgroup v1: no cgroup BPF); the "
            "directives are checked by test_node_unit_directive_loaded and the allow list above"
        )
    # Without the filter, the outside address is not refused at once: a timeout (or a
    # network error), which tells the filter's EPERM apart.
    unfiltered, _ = probe(encodage, OUTSIDE, 80, filtered=False)
    assert unfiltered != "EPERM"
    result, elapsed = probe(encodage, OUTSIDE, 80, filtered=True)
    print(f"\n{OUTSIDE}:80 under the worker's filter: {result} in {elapsed} s")
    assert result == "EPERM" and elapsed < 1, (result, elapsed)
    (lrs_host, lrs_port), (broker_host, broker_port) = peers(encodage)
    lrs, _ = probe(encodage, lrs_host, lrs_port, filtered=True)
    assert lrs == "connected", (lrs_host, lrs_port, lrs)
    broker, _ = probe(encodage, broker_host, broker_port, filtered=True)
    assert broker == "connected", (broker_host, broker_port, broker)
