"""check_xapi's configuration: its JSON file (roles/xapi_ops README, "check_xapi"), checked
whole (each error names the key, never a value), and the metrics and their thresholds."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .. import names

DEFAULT_CONFIG = "/etc/xapi-monitoring/check_xapi.json"


#: Metrics whose value is bad when high: alert at or above warning / critical.
HIGH_METRICS = (
    "queue",
    "oldest_age",
    "in_flight",
    "dead_letters",
    "dead_new",
    "last_delivery_age",
    "spool_depth",
    "spool_age",
    "spool_used",
)
#: ``nodes`` is a minimum: alert below warning / critical.
MIN_METRICS = ("nodes",)
METRICS = (*HIGH_METRICS, *MIN_METRICS, "lrs")
AGE_METRICS = ("oldest_age", "last_delivery_age", "spool_age")
PERCENT_METRICS = ("spool_used",)
DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {
    "queue": (1000, 10000),
    "oldest_age": (300, 1800),
    "in_flight": (500, 2000),
    "dead_letters": (1, 100),
    "dead_new": (1, 10),
    "last_delivery_age": (600, 3600),
    "nodes": (1, 0),
    # The spool holds what the LRS refused to take: any depth means an LRS outage under way.
    # A short one (a restart) spools a few hundred statements at Pod's usual rates, hence a
    # warning from 1000 and critical only at 100000, where a long outage becomes costly to
    # drain. By age: 15 min is longer than any restart (warning), a day means nobody acted
    # (critical). By use of max_bytes: half full leaves time to act, at 90 % the node is
    # about to stop taking from the broker (full, itself CRITICAL whatever the thresholds).
    "spool_depth": (1000, 100000),
    "spool_age": (900, 86400),
    "spool_used": (50, 90),
}


class ConfigError(Exception):
    """The configuration or the command line is wrong: UNKNOWN, naming the key."""


@dataclass(frozen=True)
class Broker:
    name: str
    host: str
    port: int = 6380
    db: int = 6
    user: str = ""
    password: str = field(default="", repr=False)
    tls: bool = False
    ca: str = ""
    dead_letter_key: str = names.DEAD_LETTERS

    @property
    def where(self) -> str:
        """How the broker is named in messages (no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "rediss" if self.tls else "redis"
        return f"{self.name} ({scheme}://{host}:{self.port}/{self.db})"


@dataclass(frozen=True)
class LRS:
    url: str
    login: str
    password: str = field(repr=False)
    ca: str = ""


@dataclass
class Config:
    brokers: list[Broker]
    lrs: LRS | None
    nodes_expected: int
    thresholds: dict[str, tuple[float, float]]
    dead_window: float
    timeout: float

    def secrets(self) -> list[str]:
        found = [b.password for b in self.brokers]
        if self.lrs is not None:
            found.append(self.lrs.password)
        return [s for s in found if s]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def _object(value: object, where: str, known: dict[str, bool]) -> dict[str, Any]:
    """``value`` as a JSON object whose keys are all in ``known`` (name -> required)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be an object")
    for key in value:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r}")
    for key, required in known.items():
        if required and key not in value:
            raise ConfigError(f"{where}: {key} is required")
    return value


def _str(obj: dict[str, Any], key: str, where: str, default: str = "", empty: bool = True) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{key} must be a string")
    if not empty and not value:
        raise ConfigError(f"{where}.{key} must not be empty")
    return value


def _int(obj: dict[str, Any], key: str, where: str, default: int, lo: int, hi: int) -> int:
    value = obj.get(key, default)
    if not _is_int(value):
        raise ConfigError(f"{where}.{key} must be an integer")
    if not lo <= value <= hi:
        raise ConfigError(f"{where}.{key} must be between {lo} and {hi}")
    return int(value)


def _positive(obj: dict[str, Any], key: str, where: str, default: float) -> float:
    value = obj.get(key, default)
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{where}.{key} must be a number greater than 0")
    return float(value)


def check_pair(name: str, warn: float, crit: float, where: str) -> None:
    """Refuse a warning threshold beyond the critical one (for ``nodes``, a minimum: below)."""
    if name in MIN_METRICS:
        if warn < crit:
            raise ConfigError(
                f"{where}: the warning threshold of {name} ({warn:g}) is below "
                f"the critical one ({crit:g}); nodes is a minimum"
            )
    elif warn > crit:
        raise ConfigError(
            f"{where}: the warning threshold of {name} ({warn:g}) is above the critical one "
            f"({crit:g})"
        )
    if warn < 0 or crit < 0:
        raise ConfigError(f"{where}: the thresholds of {name} must not be negative")


def _broker(value: object, where: str) -> Broker:
    obj = _object(
        value,
        where,
        {
            "name": True,
            "host": True,
            "port": False,
            "db": False,
            "user": False,
            "password": False,
            "tls": False,
            "ca": False,
            "dead_letter_key": False,
        },
    )
    name = _str(obj, "name", where, empty=False)
    if not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"{where}.name may hold letters, digits, '-', '_' and '.' only")
    tls = obj.get("tls", False)
    if not isinstance(tls, bool):
        raise ConfigError(f"{where}.tls must be true or false")
    return Broker(
        name=name,
        host=_str(obj, "host", where, empty=False),
        port=_int(obj, "port", where, 6380, 1, 65535),
        db=_int(obj, "db", where, 6, 0, 1 << 31),
        user=_str(obj, "user", where),
        password=_str(obj, "password", where),
        tls=tls,
        ca=_str(obj, "ca", where),
        dead_letter_key=_str(obj, "dead_letter_key", where, names.DEAD_LETTERS, empty=False),
    )


def _lrs(value: object) -> LRS:
    where = "lrs"
    obj = _object(value, where, {"url": True, "login": True, "password": True, "ca": False})
    url = _str(obj, "url", where, empty=False)
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        raise ConfigError("lrs.url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("lrs.url must be an http or https URL with a host")
    if "@" in parts.netloc:
        raise ConfigError("lrs.url must not hold credentials: use lrs.login and lrs.password")
    return LRS(
        url=url,
        login=_str(obj, "login", where, empty=False),
        password=_str(obj, "password", where),
        ca=_str(obj, "ca", where),
    )


def _thresholds(value: object) -> dict[str, tuple[float, float]]:
    obj = _object(value, "thresholds", {name: False for name in DEFAULT_THRESHOLDS})
    out = dict(DEFAULT_THRESHOLDS)
    for name, pair in obj.items():
        where = f"thresholds.{name}"
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_number(v) for v in pair):
            raise ConfigError(f"{where} must be a list of two numbers [warning, critical]")
        warn, crit = float(pair[0]), float(pair[1])
        check_pair(name, warn, crit, where)
        out[name] = (warn, crit)
    return out


def parse_config(data: object) -> Config:
    obj = _object(
        data,
        "config",
        {
            "brokers": True,
            "lrs": False,
            "nodes_expected": False,
            "thresholds": False,
            "dead_window": False,
            "timeout": False,
        },
    )
    raw_brokers = obj["brokers"]
    if not isinstance(raw_brokers, list) or not raw_brokers:
        raise ConfigError("brokers must be a non-empty list")
    brokers = [_broker(b, f"brokers[{n}]") for n, b in enumerate(raw_brokers)]
    names = [b.name for b in brokers]
    if len(set(names)) != len(names):
        raise ConfigError("brokers: each name must be unique")
    return Config(
        brokers=brokers,
        lrs=_lrs(obj["lrs"]) if "lrs" in obj else None,
        nodes_expected=_int(obj, "nodes_expected", "config", 1, 0, 10_000),
        thresholds=_thresholds(obj.get("thresholds", {})),
        dead_window=_positive(obj, "dead_window", "config", 86400),
        timeout=_positive(obj, "timeout", "config", 5),
    )


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # the position only: the message never quotes the text (a password may be there)
        raise ConfigError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    return parse_config(data)
