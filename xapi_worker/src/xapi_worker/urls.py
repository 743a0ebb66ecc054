"""URLs as the worker and check_xapi handle them: a password never shown, a query added to
the LRS's URL. Standard library only (check_xapi ships it)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def mask_url(url: str) -> str:
    """Return ``url`` with the password of its userinfo part (if any) replaced by ``****``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] if userinfo else ""
    netloc = f"{user}:****@{hostport}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def statements_query_url(lrs_url: str, query: str) -> str:
    """``lrs_url`` with ``query`` added to its own query."""
    parts = urlsplit(lrs_url)
    joined = f"{parts.query}&{query}" if parts.query else query
    return urlunsplit((parts.scheme, parts.netloc, parts.path, joined, parts.fragment))
