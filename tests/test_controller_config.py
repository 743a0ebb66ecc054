"""The controller's ansible.cfg applies to production runs too: it must not switch off SSH
host key checking (whoever sits between the controller and a host would receive the vault's
secrets). The lab's hosts are podman containers, reached without SSH: they need no exception.
"""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_key_checking_stays_on():
    config = configparser.ConfigParser()
    config.read(ROOT / "ansible.cfg")
    for section in config.sections():
        value = config[section].get("host_key_checking", "true")
        assert value.strip().lower() not in ("false", "no", "0", "off"), section
