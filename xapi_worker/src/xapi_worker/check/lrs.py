"""The LRS as check_xapi probes it: ``GET statements?limit=1`` with the worker's credentials,
no redirect followed, its answer in words."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from ..names import XAPI_VERSION, XAPI_VERSION_HEADER
from ..urls import statements_query_url
from .config import LRS
from .states import CRITICAL, OK, WARNING


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_: Any, **__: Any) -> None:  # noqa: ANN401 (urllib's signature)
        return None  # a 3xx is an answer to report, not to follow


@dataclass
class LRSState:
    state: int
    text: str
    status: int | None = None
    seconds: float | None = None


def probe_lrs(lrs: LRS, timeout: float) -> LRSState:
    url = statements_query_url(lrs.url, "limit=1")
    token = base64.b64encode(f"{lrs.login}:{lrs.password}".encode()).decode()
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked: http or https)
        url,
        headers={
            "Authorization": f"Basic {token}",
            XAPI_VERSION_HEADER: XAPI_VERSION,
            "Accept": "application/json",
        },
    )
    handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=lrs.ca or None)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    started = time.monotonic()
    try:
        with opener.open(request, timeout=timeout) as response:
            status = int(response.status)
            body = response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        status = int(exc.code)
        exc.close()
        seconds = time.monotonic() - started
        if status in (401, 403):
            return LRSState(CRITICAL, f"LRS credentials refused (HTTP {status})", status, seconds)
        return LRSState(WARNING, f"LRS answered HTTP {status}", status, seconds)
    except urllib.error.URLError as exc:
        return LRSState(CRITICAL, f"LRS unreachable ({_reason(exc.reason)})")
    except TimeoutError:
        return LRSState(CRITICAL, "LRS unreachable (timeout)")
    except (OSError, ValueError, http.client.HTTPException) as exc:  # a reset, a garbled answer
        return LRSState(CRITICAL, f"LRS unreachable ({_reason(exc)})")
    seconds = time.monotonic() - started
    if status != 200:
        return LRSState(WARNING, f"LRS answered HTTP {status}", status, seconds)
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return LRSState(WARNING, "LRS answered HTTP 200 with a body that is not JSON", 200, seconds)
    return LRSState(OK, "LRS HTTP 200", 200, seconds)


def _reason(reason: object) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS verification failed: {reason.verify_message}"
    if isinstance(reason, ssl.SSLError):
        return f"TLS failed: {type(reason).__name__}"
    if isinstance(reason, TimeoutError):
        return "timeout"
    if isinstance(reason, OSError):
        return reason.strerror or type(reason).__name__
    return type(reason).__name__ if isinstance(reason, BaseException) else str(reason)
