"""A worker's broker URL is built once, in roles/xapi (xapi_broker_urls, xapi_broker_url), and
every file that carries one takes it from there (issue 34's review, L1: worker.env took the
first of roles/xapi_encodage's own list, the probe built a third, while Pod's task module's
settings took xapi_broker_url: on a frontal that runs the worker, two different URLs).

Rendered by Ansible from the roles' defaults and vars (xapi_testsupport.playbooks.render) for
two hosts: front1, a broker host that also runs the worker, and enc1, an encoding host.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from xapi_testsupport import playbooks

ROOT = Path(__file__).resolve().parents[1]
INVENTORY = (
    "all:\n  vars:\n    ansible_connection: local\n  children:\n"
    "    pod_frontal:\n      hosts:\n        front1:\n          ansible_host: 192.0.2.11\n"
    "    xapi_broker:\n      hosts:\n        front1:\n"
    "    xapi_worker:\n      hosts:\n        front1:\n        enc1:\n"
    "          ansible_host: 192.0.2.21\n"
)
BROKER_URL = "{{ xapi_broker_url }}\n"


def env_url(text: str) -> str:
    line = next(x for x in text.splitlines() if x.startswith("XAPI_CELERY_BROKER_URL="))
    return line.split("=", 1)[1].strip('"')


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    out = tmp_path_factory.mktemp("broker-url")
    (out / "hosts.yml").write_text(INVENTORY)
    (out / "broker_url.j2").write_text(BROKER_URL)
    files = [
        ROOT / "roles/xapi/defaults/main.yml",
        ROOT / "roles/xapi_encodage_pod/defaults/main.yml",
        ROOT / "roles/xapi_encodage/defaults/main.yml",
        ROOT / "roles/xapi_encodage/vars/main.yml",
    ]
    templates = {
        str(ROOT / "roles/xapi_encodage/templates/worker.env.j2"): "worker.env",
        str(out / "broker_url.j2"): "xapi_broker_url",
    }
    extra = {
        "xapi_lrs_url": "https://lrs.example.org/xAPI/statements/",
        "xapi_lrs_login": "pod",
        "xapi_lrs_password": "a-good-lrs-password",
        "xapi_broker_password": "a-good-broker-password",
    }
    result = playbooks.render(out, templates, files, extra, str(out / "hosts.yml"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return {
        host: {name: (out / f"{host}-{name}").read_text() for name in templates.values()}
        for host in ("front1", "enc1")
    }


def test_the_worker_and_pods_task_module_get_the_same_url(
    rendered: dict[str, dict[str, str]],
) -> None:
    assert (
        env_url(rendered["front1"]["worker.env"]) == rendered["front1"]["xapi_broker_url"].strip()
    )
    assert env_url(rendered["enc1"]["worker.env"]) == rendered["enc1"]["xapi_broker_url"].strip()
    # The broker host's worker reaches its own instance over loopback, the other its address.
    assert "@127.0.0.1:6380/6" in env_url(rendered["front1"]["worker.env"])
    assert "@192.0.2.11:6380/6" in env_url(rendered["enc1"]["worker.env"])


def test_the_url_is_built_in_one_place() -> None:
    """Only roles/xapi's defaults put the URL's pieces together."""
    builders = []
    for path in sorted(ROOT.glob("roles/*/**/*")):
        if path.suffix not in (".yml", ".j2") or path.name == "argument_specs.yml":
            continue
        if re.search(r"\bxapi_broker_url_(scheme|tail)\b", path.read_text()):
            builders.append(str(path.relative_to(ROOT)))
    assert builders == ["roles/xapi/defaults/main.yml"]
