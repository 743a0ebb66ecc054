"""Filters of the worker's IP allow list (systemd's IPAddressAllow=).

IPAddressAllow= takes addresses and prefixes only, separated by spaces: anything else in an
operator's entry would be dropped by systemd with a log line (and the worker then blocked),
or, with a space, would add entries of its own. The controller has no netaddr (needed by
ansible.utils.ipaddr), so Python's own ipaddress module decides.
"""

from __future__ import annotations

import ipaddress


def _prefix(entry: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if not isinstance(entry, str) or entry != entry.strip() or not entry:
        return None
    try:
        # strict=False: 10.1.2.3/8 is read as systemd reads it, the /8 around the address.
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


def xapi_encodage_not_ip_prefixes(entries: list) -> list:
    """The entries that are not an IP address or an address/prefix-length."""
    return [entry for entry in entries if _prefix(entry) is None]


def xapi_encodage_ip_prefixes(entries: list) -> list:
    """The entries that are IP addresses or prefixes (a resolv.conf line may hold anything)."""
    return [entry for entry in entries if _prefix(entry) is not None]


def xapi_encodage_catch_all_prefixes(entries: list) -> list:
    """The entries that would allow every address (0.0.0.0/0, ::/0): the switch
    xapi_encodage_worker_ip_filter says that, an allow list entry should not."""
    return [
        entry for entry in entries if (net := _prefix(entry)) is not None and net.prefixlen == 0
    ]


class FilterModule:
    def filters(self) -> dict:
        return {
            "xapi_encodage_not_ip_prefixes": xapi_encodage_not_ip_prefixes,
            "xapi_encodage_ip_prefixes": xapi_encodage_ip_prefixes,
            "xapi_encodage_catch_all_prefixes": xapi_encodage_catch_all_prefixes,
        }
