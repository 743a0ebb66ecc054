"""HTTP client of the LRS: one pooled keep-alive ``requests.Session`` per process, basic
auth, ``X-Experience-API-Version`` on every request, connect/read timeouts, TLS verified."""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import quote, quote_plus, urlencode

import requests
from requests.adapters import HTTPAdapter

from .delivery import Answer, parse_retry_after, same_id
from .names import XAPI_VERSION
from .settings import Settings
from .urls import mask_url, statements_query_url

EXCERPT_CHARS = 500


def mask(text: str, secret: str) -> str:
    """``text`` with ``secret`` hidden, as it is and percent-encoded (a URL echoed back)."""
    if not secret:
        return text
    for form in {secret, quote(secret, safe=""), quote_plus(secret, safe="")}:
        text = text.replace(form, "****")
    return text


def excerpt(text: str, secret: str) -> str:
    """The start of an answer for logs and dead letters: masked first, then cut, so a cut
    cannot leave a prefix of the secret unmasked."""
    return mask(text, secret)[:EXCERPT_CHARS]


def _ids(response: requests.Response) -> tuple[str, ...] | None:
    """The JSON array of statement ids of a 200, or None when the body is anything else."""
    try:
        body = response.json()
    except ValueError:
        return None
    if isinstance(body, list) and all(isinstance(i, str) for i in body):
        return tuple(body)
    return None


class LRSClient:
    """Talks to ``XAPI_LRS_URL``. Safe to create before a fork: the session is (re)built
    lazily in whichever process first uses it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._session: requests.Session | None = None
        self._pid = 0

    def __repr__(self) -> str:
        return f"LRSClient({mask_url(self._settings.lrs_url)!r})"

    @property
    def session(self) -> requests.Session:
        if self._session is None or self._pid != os.getpid():
            session = requests.Session()
            session.auth = (self._settings.lrs_login, self._settings.lrs_password)
            session.headers.update(
                {
                    "X-Experience-API-Version": XAPI_VERSION,
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                }
            )
            session.verify = self._settings.ca_bundle or True
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=4, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._session = session
            self._pid = os.getpid()
        return self._session

    @property
    def timeout(self) -> tuple[float, float]:
        return (self._settings.connect_timeout, self._settings.read_timeout)

    def _answer(self, response: requests.Response, started: float) -> Answer:
        latency = (time.monotonic() - started) * 1000
        return Answer(
            status=response.status_code,
            excerpt=excerpt(response.text, self._settings.lrs_password),
            retry_after=parse_retry_after(
                response.headers.get("Retry-After"),
                time.time(),
                self._settings.retry_after_max_seconds,
            ),
            latency_ms=latency,
            ids=_ids(response) if response.status_code == 200 else None,
        )

    def _no_answer(self, exc: requests.RequestException, started: float) -> Answer:
        return Answer(
            status=None,
            error=excerpt(f"{type(exc).__name__}: {exc}", self._settings.lrs_password),
            latency_ms=(time.monotonic() - started) * 1000,
            timed_out=isinstance(exc, requests.exceptions.ReadTimeout),
        )

    def post_statements(self, statements: list[dict[str, Any]]) -> Answer:
        try:
            body = json.dumps(statements, separators=(",", ":"), ensure_ascii=False).encode()
        except UnicodeEncodeError:  # deliver() keeps such statements out; never raise here
            body = json.dumps(statements, separators=(",", ":")).encode()
        started = time.monotonic()
        try:
            response = self.session.post(
                self._settings.lrs_url, data=body, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            return self._no_answer(exc, started)
        return self._answer(response, started)

    def get_statement(self, statement_id: str) -> tuple[Answer, dict[str, Any] | None]:
        """GET statements?statementId=ID: the LRS's answer and the statement it holds (None
        unless a 200 carries a statement object with that id). A UUID the LRS does not hold
        as sent is asked again in lower case: an LRS may store (and look up) ids in lower
        case whatever case they came in (Ralph does)."""
        answer, stored = self._get_statement(statement_id)
        lower = statement_id.lower()
        if stored is None and answer.status in (200, 404) and lower != statement_id:
            if same_id(lower, statement_id):
                return self._get_statement(lower, statement_id)
        return answer, stored

    def _get_statement(
        self, asked: str, statement_id: str | None = None
    ) -> tuple[Answer, dict[str, Any] | None]:
        statement_id = statement_id or asked
        url = statements_query_url(self._settings.lrs_url, urlencode({"statementId": asked}))
        started = time.monotonic()
        try:
            response = self.session.get(url, timeout=self.timeout, allow_redirects=False)
        except requests.RequestException as exc:
            return self._no_answer(exc, started), None
        answer = self._answer(response, started)
        if response.status_code != 200:
            return answer, None
        try:
            body = response.json()
        except ValueError:
            return answer, None
        if isinstance(body, dict) and isinstance(body.get("statements"), list):
            # an LRS that answers with a StatementResult even for one id
            body = next((s for s in body["statements"] if isinstance(s, dict)), None)
        if isinstance(body, dict) and same_id(body.get("id"), statement_id):
            return answer, body
        return answer, None

    def probe(self) -> requests.Response:
        """GET statements?limit=1 (used by ``xapi-worker check``); exceptions propagate."""
        url = statements_query_url(self._settings.lrs_url, "limit=1")
        return self.session.get(url, timeout=self.timeout, allow_redirects=False)
