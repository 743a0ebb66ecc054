"""Settings of the xAPI worker: a KEY=VALUE file named by ``XAPI_WORKER_CONFIG``, then the
process environment, which overrides the file.

Pod's own names (``XAPI_LRS_URL``, ``XAPI_LRS_LOGIN``, ``XAPI_LRS_PWD``,
``XAPI_CELERY_BROKER_URL``) are kept so one file can serve Pod and the worker; the worker's own
knobs are prefixed ``XAPI_WORKER_``. Secrets never appear in ``repr()``, in error messages or in
logs: :func:`mask_url` hides a password embedded in a URL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .content import MAX_STATEMENT_BYTES
from .names import DEAD_LETTERS
from .spool import batch_bytes, min_max_bytes
from .urls import mask_url

CONFIG_ENV = "XAPI_WORKER_CONFIG"
TASK_NAME = "pod.xapi.xapi_tasks.send_xapi_statement_task"

#: XAPI_WORKER_RETRY_AFTER_MAX_SECONDS's bounds: at least a second, at most a day (an LRS
#: that asks for more is down for maintenance; the operator is better told by the backlog).
RETRY_AFTER_BOUNDS = (1.0, 86400.0)
#: XAPI_WORKER_MAX_STATEMENT_KB's bounds: Pod's statements are 1 to 3 kB; a batch of the
#: largest must stay a reasonable POST, and the spool's headroom (a batch of them) small.
STATEMENT_KB_BOUNDS = (16, 1024)

_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ESCAPE_RE = re.compile(r'\\(["\\])')


class SettingsError(ValueError):
    """A setting is missing or malformed. The message names the setting, never its value."""


def parse_config_text(text: str, source: str = "config file") -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines: blank lines and ``#`` comments ignored, an optional
    ``export`` prefix accepted, values optionally wrapped in single or double quotes."""
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            raise SettingsError(f"{source}, line {lineno}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                # One pass, left to right: `\\"` is an escaped backslash then the quote.
                value = _ESCAPE_RE.sub(r"\1", value)
        elif value and value[0] in "'\"":
            raise SettingsError(f"{source}, line {lineno}: unterminated quote for {key}")
        values[key] = value
    return values


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer") from None
    if value <= 0:
        raise SettingsError(f"{name} must be greater than 0")
    return value


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number") from None
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{name} must be a finite number greater than 0")
    return value


def _url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    try:
        parts = urlsplit(raw)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        raise SettingsError(f"{name} is not a valid URL") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise SettingsError(f"{name} must be a URL of scheme {' or '.join(schemes)} with a host")
    return raw


def _http_url(name: str, raw: str) -> str:
    return _url(name, raw, ("http", "https"))


def _redis_url(name: str, raw: str) -> str:
    return _url(name, raw, ("redis", "rediss"))


def _nonempty(name: str, raw: str) -> str:
    if not raw:
        raise SettingsError(f"{name} is empty")
    return raw


def _ca_bundle(name: str, raw: str) -> str:
    if raw and not Path(raw).is_file():
        raise SettingsError(f"{name} names a file that does not exist: {raw}")
    return raw


def _non_negative_int(name: str, raw: str) -> int:
    return 0 if raw.strip() == "0" else _positive_int(name, raw)


def _spool_dir(name: str, raw: str) -> str:
    if raw and not Path(raw).is_absolute():
        raise SettingsError(f"{name} must be an absolute path")
    if raw and not Path(raw).is_dir():
        raise SettingsError(f"{name} names a directory that does not exist: {raw}")
    return raw


Parser = Callable[[str, str], Any]


def setting(
    name: str,
    parse: Parser,
    default: Any = MISSING,  # noqa: ANN401 (any setting's type)
    *,
    secret: bool = False,
) -> Any:  # noqa: ANN401 (a dataclass field)
    """One setting, declared once: its external name, its parser, its default (none: the
    setting is required) and whether it is a secret (hidden from repr and public_view)."""
    metadata = {"name": name, "parse": parse, "secret": secret}
    if default is MISSING:
        return field(repr=not secret, metadata=metadata)
    return field(default=default, repr=not secret, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Effective settings, each declared once below with its external name."""

    lrs_url: str = setting("XAPI_LRS_URL", _http_url)
    lrs_login: str = setting("XAPI_LRS_LOGIN", _nonempty)
    lrs_password: str = setting("XAPI_LRS_PWD", _nonempty, secret=True)
    broker_url: str = setting("XAPI_CELERY_BROKER_URL", _redis_url, secret=True)
    batch_size: int = setting("XAPI_WORKER_BATCH_SIZE", _positive_int, 100)
    flush_interval_ms: int = setting("XAPI_WORKER_FLUSH_INTERVAL_MS", _positive_int, 500)
    connect_timeout: float = setting("XAPI_WORKER_CONNECT_TIMEOUT", _positive_float, 5.0)
    read_timeout: float = setting("XAPI_WORKER_READ_TIMEOUT", _positive_float, 30.0)
    max_age_days: float = setting("XAPI_WORKER_MAX_AGE_DAYS", _positive_float, 7.0)
    ca_bundle: str = setting("XAPI_WORKER_CA_BUNDLE", _ca_bundle, "")
    visibility_timeout: int = setting("XAPI_WORKER_VISIBILITY_TIMEOUT", _positive_int, 600)
    retry_base_seconds: float = setting("XAPI_WORKER_RETRY_BASE_SECONDS", _positive_float, 2.0)
    retry_max_seconds: float = setting("XAPI_WORKER_RETRY_MAX_SECONDS", _positive_float, 300.0)
    # The longest Retry-After of the LRS honoured (a longer one, or a date further ahead, is
    # cut to it): between RETRY_AFTER_BOUNDS.
    retry_after_max_seconds: float = setting(
        "XAPI_WORKER_RETRY_AFTER_MAX_SECONDS", _positive_float, 3600.0
    )
    dead_letter_key: str = setting("XAPI_WORKER_DEAD_LETTER_KEY", _nonempty, DEAD_LETTERS)
    # 0 = derived: 2 x batch size
    prefetch_multiplier: int = setting("XAPI_WORKER_PREFETCH_MULTIPLIER", _non_negative_int, 0)
    # A batch holding a statement tried this many times is split on a 5xx or a timeout.
    isolate_after: int = setting("XAPI_WORKER_ISOLATE_AFTER", _positive_int, 3)
    # The durable spool (spool.py): its directory (empty: off, statements wait in Redis),
    # one node's size limit (0: a quarter of the free disk, at most 10 GiB), and after how
    # many failing batches in a row live batches go to the spool without a POST.
    spool_dir: str = setting("XAPI_WORKER_SPOOL_DIR", _spool_dir, "")
    spool_max_mb: int = setting("XAPI_WORKER_SPOOL_MAX_MB", _non_negative_int, 0)
    spool_after: int = setting("XAPI_WORKER_SPOOL_AFTER", _positive_int, 3)
    # Dead letters older than this are purged by the worker (0: kept until purged by hand).
    dead_letter_retention_days: int = setting(
        "XAPI_WORKER_DEAD_LETTER_RETENTION_DAYS", _non_negative_int, 30
    )
    # With the spool on, a node's dead letters are kept in its spool file (deadstore.py), up
    # to this many MiB (within the spool's own limit, which covers the whole file).
    dead_letter_max_mb: int = setting("XAPI_WORKER_DEAD_LETTER_MAX_MB", _positive_int, 512)
    # The largest statement taken (its JSON text in UTF-8, KiB; larger: dead-lettered without
    # a POST), the unit of the spool's headroom: between STATEMENT_KB_BOUNDS.
    max_statement_kb: int = setting(
        "XAPI_WORKER_MAX_STATEMENT_KB", _positive_int, MAX_STATEMENT_BYTES // 1024
    )

    @property
    def broker_url_masked(self) -> str:
        return mask_url(self.broker_url)

    @property
    def max_statement_bytes(self) -> int:
        return self.max_statement_kb * 1024

    @property
    def spool_enabled(self) -> bool:
        return bool(self.spool_dir)

    @property
    def effective_prefetch_multiplier(self) -> int:
        return self.prefetch_multiplier or 2 * self.batch_size

    def public_view(self) -> dict[str, Any]:
        """Every setting by its external name, secrets masked (for ``xapi-worker settings``)."""
        view: dict[str, Any] = {}
        for f in fields(self):
            value: Any = getattr(self, f.name)
            if f.metadata["secret"]:
                value = mask_url(value) if "://" in value else ("****" if value else "")
            elif f.name == "lrs_url":
                value = mask_url(value)
            view[f.metadata["name"]] = value
        return view


SETTING_NAMES = tuple(f.metadata["name"] for f in fields(Settings))


def settings_from_mapping(values: Mapping[str, str]) -> Settings:
    """Build :class:`Settings` from external names; raise :class:`SettingsError` naming the
    first missing or malformed setting."""
    kwargs: dict[str, Any] = {}
    for f in fields(Settings):
        name = f.metadata["name"]
        required = f.default is MISSING
        raw = values.get(name)
        if raw is None or (required and raw.strip() == ""):
            if required:
                raise SettingsError(f"{name} is not set")
            continue
        # A secret is taken verbatim: a password may begin or end with a space.
        value = raw if f.metadata["secret"] else raw.strip()
        kwargs[f.name] = f.metadata["parse"](name, value)
    settings = Settings(**kwargs)
    # A countdown (retry) message is held unacknowledged by the worker until it is due, then
    # waits at most one flush interval and one HTTP exchange; Redis gives it to another
    # consumer once it has been unacknowledged for visibility_timeout seconds.
    budget = (
        settings.retry_max_seconds
        + settings.flush_interval_ms / 1000
        + settings.connect_timeout
        + settings.read_timeout
    )
    if budget >= settings.visibility_timeout:
        raise SettingsError(
            "XAPI_WORKER_VISIBILITY_TIMEOUT must exceed XAPI_WORKER_RETRY_MAX_SECONDS + "
            "XAPI_WORKER_FLUSH_INTERVAL_MS/1000 + XAPI_WORKER_CONNECT_TIMEOUT + "
            f"XAPI_WORKER_READ_TIMEOUT (= {budget:g} s)"
        )
    low_kb, high_kb = STATEMENT_KB_BOUNDS
    if not low_kb <= settings.max_statement_kb <= high_kb:
        raise SettingsError(
            f"XAPI_WORKER_MAX_STATEMENT_KB must be between {low_kb} and {high_kb}: it is "
            f"{settings.max_statement_kb}"
        )
    statement = settings.max_statement_bytes
    low, high = RETRY_AFTER_BOUNDS
    if not low <= settings.retry_after_max_seconds <= high:
        raise SettingsError(
            f"XAPI_WORKER_RETRY_AFTER_MAX_SECONDS must be between {low:g} and {high:g} "
            f"seconds: it is {settings.retry_after_max_seconds:g}"
        )
    if settings.retry_base_seconds > settings.retry_max_seconds:
        raise SettingsError(
            "XAPI_WORKER_RETRY_BASE_SECONDS must not exceed XAPI_WORKER_RETRY_MAX_SECONDS"
        )
    # A spool counts as full with less room than one batch of the largest statements: a
    # limit must hold a few such batches (spool.min_max_bytes).
    smallest = -(-min_max_bytes(settings.batch_size, statement) // 1024**2)
    if 0 < settings.spool_max_mb < smallest:
        raise SettingsError(
            f"XAPI_WORKER_SPOOL_MAX_MB must be 0 (automatic) or at least {smallest} with "
            f"XAPI_WORKER_BATCH_SIZE={settings.batch_size} (four batches of the largest "
            f"statements, XAPI_WORKER_MAX_STATEMENT_KB={settings.max_statement_kb}): it is "
            f"{settings.spool_max_mb}"
        )
    # A node's dead letters count as full with less room than one batch of the largest.
    smallest = -(-2 * batch_bytes(settings.batch_size, statement) // 1024**2)
    if settings.spool_enabled and settings.dead_letter_max_mb < smallest:
        raise SettingsError(
            f"XAPI_WORKER_DEAD_LETTER_MAX_MB must be at least {smallest} with "
            f"XAPI_WORKER_BATCH_SIZE={settings.batch_size} (two batches of the largest "
            f"statements): it is {settings.dead_letter_max_mb}"
        )
    # The spool's limit covers the whole file, its dead letters too: a limit that the dead
    # letters alone can fill makes the spool full (the node stops taking) while the LRS
    # takes every statement, and the dead letters' own limit is never met.
    spool_min = -(-min_max_bytes(settings.batch_size, statement) // 1024**2)
    needed = settings.dead_letter_max_mb + spool_min
    if settings.spool_enabled and 0 < settings.spool_max_mb < needed:
        raise SettingsError(
            f"XAPI_WORKER_SPOOL_MAX_MB must be 0 (automatic) or at least {needed}: "
            f"XAPI_WORKER_DEAD_LETTER_MAX_MB ({settings.dead_letter_max_mb}), which the dead "
            f"letters take of the same file, plus {spool_min} for the statements (four "
            f"batches of the largest with XAPI_WORKER_BATCH_SIZE={settings.batch_size}): it "
            f"is {settings.spool_max_mb}"
        )
    return settings


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Read the file named by ``XAPI_WORKER_CONFIG`` (if set), then let ``environ`` override."""
    env = os.environ if environ is None else environ
    merged: dict[str, str] = {}
    path = env.get(CONFIG_ENV, "")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"{CONFIG_ENV}: cannot read {path}: {exc.strerror}") from None
        file_values = parse_config_text(text, source=path)
        unknown = sorted(
            k for k in file_values if k.startswith("XAPI_WORKER_") and k not in SETTING_NAMES
        )
        if unknown:
            raise SettingsError(f"{path}: unknown setting {unknown[0]}")
        merged.update(file_values)
    for name in SETTING_NAMES:
        if name in env:
            merged[name] = env[name]
    return settings_from_mapping(merged)
