"""check_xapi (xapi_worker.check) against a real redis-server, Ralph and this package's
worker: run as a monitoring host runs it, in the form roles/xapi_ops ships it (its launcher
and the package's stdlib-only modules, the system's /usr/bin/python3 -I, no venv, a JSON
configuration file), its one status line, performance data and exit code read back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from support import (
    LRS_PASSWORD,
    LRS_USER,
    REPO,
    Proxy,
    RedisServer,
    free_port,
    pod_producer,
    wait_for,
)
from xapi_testsupport.check_xapi import ship
from xapi_testsupport.statements import invalid, statement, video_statement
from xapi_worker.check.prometheus import _le

_SHIPPED = tempfile.TemporaryDirectory(prefix="check_xapi-")
PLUGIN = ship(Path(_SHIPPED.name))
# The system's Python of the monitored hosts; CHECK_XAPI_PYTHON tries another (3.13: Debian 13).
PYTHON = os.environ.get("CHECK_XAPI_PYTHON", "/usr/bin/python3")
REDIS_PASSWORD = "r3dis-Monitor-pw"
#: Every secret any test writes into a configuration: never in any output.
SECRETS = (LRS_PASSWORD, REDIS_PASSWORD, "wrong-Lrs-pw-42", "wrong-Redis-pw-42")
PERF = re.compile(r"'([^']+)'=([0-9.]+)(s|%|);([0-9.]*);([0-9.]*);([0-9.]*);")
STATUS = re.compile(r"^XAPI (OK|WARNING|CRITICAL|UNKNOWN) - .+")
CODES = {"OK": 0, "WARNING": 1, "CRITICAL": 2, "UNKNOWN": 3}


def write(tmp_path: Path, config: dict[str, Any], name: str = "check_xapi.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def broker_entry(port: int, **extra: Any) -> dict[str, Any]:
    return {"name": "frontal1", "host": "127.0.0.1", "port": port, "db": 6, **extra}


def lrs_entry(url: str, password: str = LRS_PASSWORD) -> dict[str, Any]:
    return {"url": url, "login": LRS_USER, "password": password}


class Result:
    def __init__(self, proc: subprocess.CompletedProcess[str]) -> None:
        self.code = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr
        self.line = proc.stdout.rstrip("\n")

    @property
    def state(self) -> str:
        return self.line.split(" ", 2)[1]

    @property
    def text(self) -> str:
        return self.line.split(" | ", 1)[0]

    def perf(self) -> dict[str, tuple[float, str, str, str]]:
        data = self.line.split(" | ", 1)[1] if " | " in self.line else ""
        found = {m[0]: (float(m[1]), m[2], m[3], m[4]) for m in PERF.findall(data)}
        assert len(found) == len(data.split()), data  # every item parsed
        return found


def check(config: Path, *args: str) -> Result:
    proc = subprocess.run(
        [PYTHON, "-I", str(PLUGIN), "-C", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},  # no venv, no PYTHONPATH
        cwd="/",
    )
    result = Result(proc)
    for secret in SECRETS:
        assert secret not in proc.stdout + proc.stderr, "a password in the output"
    assert result.out.count("\n") == 1, result.out  # exactly one line
    assert STATUS.match(result.line), result.line
    assert result.code == CODES[result.state], (result.code, result.line)
    assert "Traceback" not in proc.stdout + proc.stderr
    print(result.line)  # the states of the report (pytest -s)
    return result


def fresh(n: int, age: float = 0.0) -> dict[str, Any]:
    """A valid statement whose timestamp is ``age`` seconds ago."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - age)) + "Z"
    return statement(
        "played", object_id=f"https://pod.example.org/video/{n:04d}-m/", timestamp=stamp
    )


# --- with a real worker --------------------------------------------------------------------
def test_healthy_then_credentials_refused_then_lrs_stopped(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    start_worker(make_config(ralph.url))
    sent = [video_statement("played", n) for n in range(3)]
    with pod_producer(redis_srv.url()) as delay:
        for s in sent:
            delay(s)
    r = redis_srv.client()
    assert wait_for(lambda: len(ralph.stored()) == 3 and r.exists("xapi.last_delivery"), 30)
    assert wait_for(lambda: r.hlen("unacked") == 0, 10)
    config = {"brokers": [broker_entry(redis_srv.port)], "lrs": lrs_entry(ralph.url)}
    good = write(tmp_path, config)

    healthy = check(good)
    assert healthy.code == 0, healthy.line
    assert healthy.line.startswith("XAPI OK - queue 0, 0 in flight, 1/1 nodes, 0 dead letters")
    perf = healthy.perf()
    assert perf["queue"][0] == 0 and perf["queue"][2:] == ("1000", "10000")
    assert perf["nodes"][0] == 1 and perf["in_flight"][0] == 0
    assert perf["dead_letters"][0] == 0 and perf["dead_new"][0] == 0
    assert 0 <= perf["last_delivery_age"][0] < 60 and perf["last_delivery_age"][1] == "s"
    assert perf["lrs_time"][1] == "s"
    assert "oldest_age" not in perf  # nothing queued

    refused = check(
        write(tmp_path, {**config, "lrs": lrs_entry(ralph.url, "wrong-Lrs-pw-42")}, "b.json")
    )
    assert refused.code == 2
    assert refused.text.startswith("XAPI CRITICAL - LRS credentials refused (HTTP 401)")

    ralph.stop()
    stopped = check(good)
    assert stopped.code == 2
    assert stopped.text.startswith("XAPI CRITICAL - LRS unreachable (")
    assert check(good, "--metric", "queue").code == 0  # the broker side alone is fine
    assert check(good, "--metric", "lrs").code == 2


def test_dead_letters_counted_new_and_old(tmp_path, redis_srv, ralph, make_config, start_worker):
    worker = start_worker(make_config(ralph.url))
    bad = invalid(fresh(1), 0)  # no verb: Ralph refuses it, the worker dead-letters it
    with pod_producer(redis_srv.url()) as delay:
        delay(bad)
    r = redis_srv.client()
    assert wait_for(lambda: r.llen("xapi.dead_letters") == 1, 30), worker.text()
    # an older one, two days ago, at the oldest end (the worker appends on the right)
    two_days_ago = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 172800))
    old = {"statement": {}, "reason": "test", "time": two_days_ago}
    r.lpush("xapi.dead_letters", json.dumps(old))
    config = {"brokers": [broker_entry(redis_srv.port)], "lrs": lrs_entry(ralph.url)}

    warned = check(write(tmp_path, config))
    assert warned.code == 1, warned.line
    assert warned.text.startswith("XAPI WARNING - 2 dead letters (>= 1); 1 new dead letters (>= 1)")
    perf = warned.perf()
    assert perf["dead_letters"][0] == 2 and perf["dead_new"][0] == 1

    strict = {**config, "thresholds": {"dead_new": [0, 1]}}
    critical = check(write(tmp_path, strict, "strict.json"))
    assert critical.code == 2
    assert critical.text.startswith("XAPI CRITICAL - 1 new dead letters (>= 1); 2 dead letters")

    narrow = {**config, "dead_window": 0.001}  # nothing is new within a millisecond
    assert check(write(tmp_path, narrow, "narrow.json")).perf()["dead_new"][0] == 0


def test_workers_stopped_while_statements_arrive(
    tmp_path, redis_srv, ralph, make_config, start_worker
):
    worker = start_worker(make_config(ralph.url))
    with pod_producer(redis_srv.url()) as delay:
        delay(fresh(0))
        r = redis_srv.client()
        assert wait_for(lambda: r.exists("xapi.last_delivery"), 30), worker.text()
        worker.stop()  # a clean stop gives up the node's heartbeat
        for n in range(1, 8):
            delay(fresh(n, age=400 - n))  # the oldest queued 399 s ago
    config = {
        "brokers": [broker_entry(redis_srv.port)],
        "lrs": lrs_entry(ralph.url),
        "thresholds": {"queue": [5, 100]},
    }
    result = check(write(tmp_path, config))
    assert result.code == 2, result.line
    assert result.text.startswith(
        "XAPI CRITICAL - statements accumulate while the LRS answers: no worker consumes "
        "(queue 7, 0 worker nodes alive)"
    )
    assert "WARNING" not in result.text
    assert "queue 7 (>= 5)" in result.text and "0 worker nodes alive (< 1)" in result.text
    assert "oldest statement queued" in result.text  # 399 s >= 300
    perf = result.perf()
    assert perf["queue"][0] == 7 and perf["nodes"][0] == 0
    assert 390 <= perf["oldest_age"][0] < 460 and perf["oldest_age"][1] == "s"
    assert perf["last_delivery_age"][0] < 60  # a recent delivery: no alert on it

    # without the LRS (a frontal's own check): no such diagnosis, the parts only
    frontal_config = write(tmp_path, {k: v for k, v in config.items() if k != "lrs"}, "f.json")
    frontal = check(frontal_config)
    assert frontal.code == 1 and "no worker consumes" not in frontal.line
    assert "lrs_time" not in frontal.perf()

    # a long silence with statements waiting is alerted on
    r.set("xapi.last_delivery", str(time.time() - 4000))
    late = check(frontal_config)
    assert re.search(r"last delivery 400[01] s ago with 7 queued \(>= 3600 s\)", late.text)
    assert late.code == 2


# --- the broker alone ----------------------------------------------------------------------
def test_broker_unreachable_or_refusing(tmp_path, redis_srv):
    port = free_port()
    config = {"brokers": [broker_entry(port, password=REDIS_PASSWORD)], "timeout": 2}
    down = check(write(tmp_path, config))
    assert down.code == 2
    assert down.line == (
        f"XAPI CRITICAL - broker frontal1 (redis://127.0.0.1:{port}/6) unreachable "
        "(ConnectionRefusedError)"
    )
    r = redis_srv.client()
    r.config_set("requirepass", REDIS_PASSWORD)
    wrong = broker_entry(redis_srv.port, user="default", password="wrong-Redis-pw-42")
    refused = check(write(tmp_path, {"brokers": [wrong]}, "wrong.json"))
    assert refused.code == 2
    assert refused.text.endswith("refused authentication (WRONGPASS)")
    anonymous = check(write(tmp_path, {"brokers": [broker_entry(redis_srv.port)]}, "anon.json"))
    assert anonymous.code == 2 and "refused authentication (NOAUTH)" in anonymous.text
    right = broker_entry(redis_srv.port, user="default", password=REDIS_PASSWORD)
    two = {"brokers": [right, {**right, "name": "frontal2", "port": port}], "nodes_expected": 0}
    both = check(write(tmp_path, two, "two.json"))
    assert both.code == 2
    assert both.text.startswith(f"XAPI CRITICAL - broker frontal2 (redis://127.0.0.1:{port}/6)")
    assert "frontal1: queue 0" in both.text
    assert set(both.perf()) >= {"frontal1_queue", "frontal1_nodes", "frontal1_dead_new"}


def test_metric_queue_thresholds(tmp_path, redis_srv):
    config = write(tmp_path, {"brokers": [broker_entry(redis_srv.port)]})
    empty = check(config, "--metric", "queue", "-w", "1", "-c", "5")
    assert empty.line == "XAPI OK - queue 0 | 'queue'=0;1;5;0;"
    with pod_producer(redis_srv.url()) as delay:
        delay(fresh(0))
        one = check(config, "--metric", "queue", "-w", "1", "-c", "5")
        assert one.line == "XAPI WARNING - queue 1 (>= 1) | 'queue'=1;1;5;0;"
        for n in range(1, 5):
            delay(fresh(n))
    five = check(config, "--metric", "queue", "-w", "1", "-c", "5")
    assert five.line == "XAPI CRITICAL - queue 5 (>= 5) | 'queue'=5;1;5;0;"
    # one of the two given: the other from the file (here the defaults, 1000 and 10000)
    assert check(config, "--metric", "queue", "-w", "3").line.startswith("XAPI WARNING - queue 5")
    assert check(config, "--metric", "queue").code == 0
    full = check(config)  # 5 fresh statements, no worker ever: nodes below the minimum
    assert full.code == 1 and full.text.startswith("XAPI WARNING - 0 worker nodes alive (< 1)")


def test_lrs_answers_that_are_not_a_statement_result(tmp_path, redis_srv):
    """A maintenance page with a 200, a 503, a redirect: WARNING with the status."""
    answers = {
        "page": (200, {"Content-Type": "text/html"}, b"<html>Maintenance</html>"),
        "down": (503, {"Content-Type": "text/plain"}, b"busy"),
        "moved": (302, {"Location": "https://elsewhere.example.org/"}, b""),
    }
    current = {"answer": answers["page"]}
    proxy = Proxy(upstream_port=free_port(), respond=lambda _req: current["answer"]).start()
    try:
        base = {"brokers": [broker_entry(redis_srv.port)], "lrs": lrs_entry(proxy.url)}
        config = write(tmp_path, base)
        page = check(config, "--metric", "lrs")
        assert page.line.startswith(
            "XAPI WARNING - LRS answered HTTP 200 with a body that is not JSON | 'lrs_time'="
        )
        current["answer"] = answers["down"]
        assert check(config, "--metric", "lrs").text == "XAPI WARNING - LRS answered HTTP 503"
        current["answer"] = answers["moved"]
        assert check(config, "--metric", "lrs").text == "XAPI WARNING - LRS answered HTTP 302"
        request = proxy.requests[-1]
        assert request.method == "GET" and request.path == "/xAPI/statements/?limit=1"
        headers = {k.lower(): v for k, v in request.headers.items()}  # urllib's X-experience-...
        assert headers["x-experience-api-version"] == "1.0.3"
        assert headers["authorization"].startswith("Basic ")
        assert len(proxy.requests) == 3  # the redirect is not followed
    finally:
        proxy.stop()


def _tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate of 127.0.0.1 it signed, with the extensions Python
    3.13's strict verification (VERIFY_X509_STRICT) requires."""
    ca, ca_key, cert, key = (directory / n for n in ("ca.crt", "ca.key", "srv.crt", "srv.key"))
    ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2".split()

    def openssl(*args: object) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)

    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        ca_key,
        "-out",
        ca,
        "-subj",
        "/CN=check_xapi CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl("req", *ec, "-keyout", key, "-out", directory / "srv.csr", "-subj", "/CN=127.0.0.1")
    (directory / "ext").write_text(
        "subjectAltName=IP:127.0.0.1\nkeyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\nauthorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\nbasicConstraints=CA:FALSE\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        directory / "srv.csr",
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-out",
        cert,
        "-days",
        "2",
        "-extfile",
        directory / "ext",
    )
    key.chmod(0o600)
    return ca, cert, key


def test_broker_over_tls(tmp_path):
    ca, cert, key = _tls_files(tmp_path)
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "tls",
        False,
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(ca),
        "--tls-auth-clients",
        "no",
    )
    try:
        idle = {"nodes_expected": 0, "thresholds": {"nodes": [0, 0]}}
        verified = broker_entry(tls_port, tls=True, ca=str(ca))
        ok = check(write(tmp_path, {"brokers": [verified], **idle}))
        assert ok.line.startswith("XAPI OK - queue 0, 0 in flight, 0/0 nodes"), ok.line
        untrusted = check(write(tmp_path, {"brokers": [{**verified, "ca": ""}], **idle}, "u.json"))
        assert untrusted.code == 2
        assert untrusted.text.startswith(
            f"XAPI CRITICAL - broker frontal1 (rediss://127.0.0.1:{tls_port}/6): TLS "
            "verification failed ("
        )
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"brokers": []}, "brokers"),
        ({"brokers": [{"name": "f", "host": "h"}], "extra": 1}, "'extra'"),
        ({"brokers": [{"name": "f", "host": "h", "port": "6380"}]}, "brokers[0].port"),
        ({"brokers": [{"name": "f", "host": "h", "tls": "yes"}]}, "brokers[0].tls"),
        ({"brokers": [{"name": "f", "host": "h", "pasword": "x"}]}, "'pasword'"),
        ({"brokers": [{"name": "f", "host": "h"}], "thresholds": {"queue": [10, 5]}}, "queue"),
        ({"brokers": [{"name": "f", "host": "h"}], "thresholds": {"nodes": [0, 1]}}, "nodes"),
        ({"brokers": [{"name": "f", "host": "h"}], "thresholds": {"qeue": [1, 2]}}, "'qeue'"),
        ({"brokers": [{"name": "f", "host": "h"}], "timeout": True}, "timeout"),
        (
            {
                "brokers": [{"name": "f", "host": "h"}],
                "lrs": {"url": "ftp://x/", "login": "l", "password": LRS_PASSWORD},
            },
            "lrs.url",
        ),
        ({"brokers": [{"name": "f", "host": "h"}], "lrs": {"url": "http://x/"}}, "lrs: login"),
    ],
)
def test_bad_config_is_unknown_naming_the_key(tmp_path, config, named):
    result = check(write(tmp_path, config))
    assert result.code == 3
    assert result.line.startswith("XAPI UNKNOWN - configuration: ")
    assert named in result.line


def test_usage_errors_are_unknown(tmp_path):
    config = write(tmp_path, {"brokers": [{"name": "f", "host": "127.0.0.1", "port": 1}]})
    assert "need --metric" in check(config, "-w", "1").line
    assert (
        "warning threshold of queue (5) is above"
        in check(config, "--metric", "queue", "-w", "5", "-c", "1").line
    )
    assert check(config, "--metric", "queue", "-c", "6").code == 3  # default warning 1000 > 6
    assert check(config, "--metric", "nosuch").code == 3
    assert check(config, "-w", "x", "--metric", "queue").code == 3
    unreadable = tmp_path / "not-json.json"
    unreadable.write_text('{"brokers": [{"password": "' + REDIS_PASSWORD + '"')
    assert check(unreadable).line.startswith("XAPI UNKNOWN - configuration: ")
    version = subprocess.run([PYTHON, "-I", str(PLUGIN), "-V"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("check_xapi ")


# --- the nodes' on-disk spools (the hash <in-flight list>.spool, written here by hand) ------
MiB = 1 << 20


def set_node(r: Any, node: str, alive: bool = True, **spool: Any) -> None:
    """A node as its worker shows it: registered, its heartbeat, and (given fields) its spool."""
    member = f"xapi.inflight.{node}"
    r.sadd("xapi.inflight", member)
    if alive:
        r.set(member + ".alive", "1", ex=60)
    if spool:
        now = time.time()
        fields = {
            "depth": 0,
            "oldest": "",
            "bytes": 0,
            "max_bytes": 100 * MiB,
            "full": 0,
            "damaged": 0,
            "updated": now,
        }
        fields.update(spool)
        r.hset(member + ".spool", mapping={k: str(v) for k, v in fields.items()})


def prometheus(config: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """check_xapi --prometheus -, read by prometheus_client's parser: {(sample, labels): value}.
    The parser is the tools venv's (tools/requirements.txt) when this venv lacks it."""
    proc = subprocess.run(
        [PYTHON, "-I", str(PLUGIN), "-C", str(config), "--prometheus", "-"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        check=True,
    )
    script = (
        "import json, sys\n"
        "from prometheus_client.parser import text_string_to_metric_families as parse\n"
        "out = [[f.type, s.name, sorted(s.labels.items()), s.value]\n"
        "       for f in parse(sys.stdin.read()) for s in f.samples]\n"
        "print(json.dumps(out))\n"
    )
    try:
        import prometheus_client  # noqa: F401

        python = sys.executable
    except ImportError:
        python = str(REPO / ".venv" / "bin" / "python")
        if not Path(python).exists():
            pytest.skip("prometheus_client: neither in this venv nor in the tools venv")
    parsed = subprocess.run(
        [python, "-c", script], input=proc.stdout, capture_output=True, text=True, check=True
    )
    families = json.loads(parsed.stdout)
    assert "# TYPE xapi_spool_depth gauge" in proc.stdout
    return {(name, tuple(tuple(p) for p in labels)): value for _, name, labels, value in families}


def test_spool_healthy_one_node(tmp_path, redis_srv):
    r = redis_srv.client()
    set_node(r, "enc1", **{"depth": 0, "bytes": 4096})
    config = write(tmp_path, {"brokers": [broker_entry(redis_srv.port)]})
    result = check(config)
    assert result.code == 0, result.line
    assert "0 spooled, spool 0 % used" in result.text
    perf = result.perf()
    assert perf["spool_depth"] == (0, "", "1000", "100000")
    assert perf["spool_age"] == (0, "s", "900", "86400")
    assert perf["spool_used"] == (0, "%", "50", "90")


def test_spool_absent_reports_nothing(tmp_path, redis_srv):
    set_node(redis_srv.client(), "enc1")  # spool off, or a worker older than the spool
    result = check(write(tmp_path, {"brokers": [broker_entry(redis_srv.port)]}))
    assert result.code == 0 and "spool" not in result.line
    assert (
        check(
            write(tmp_path, {"brokers": [broker_entry(redis_srv.port)]}), "--metric", "spool_depth"
        ).line
        == "XAPI OK - spool_depth not available"
    )


def test_spool_filling_then_full_two_nodes(tmp_path, redis_srv):
    r = redis_srv.client()
    now = time.time()
    set_node(r, "enc1", depth=30, oldest=now - 1000, bytes=60 * MiB)  # 60 %, 1000 s
    set_node(r, "enc2", depth=12, oldest=now - 100, bytes=10 * MiB)
    config = write(tmp_path, {"brokers": [broker_entry(redis_srv.port)], "nodes_expected": 2})
    filling = check(config)
    assert filling.code == 1, filling.line
    assert filling.text.startswith("XAPI WARNING - oldest statement spooled 10")
    assert "spool filling: spool of node enc1 60 % used (>= 50 %)" in filling.text
    assert "42 spooled (oldest 10" in filling.text  # problems first, then the summary
    perf = filling.perf()
    assert perf["spool_depth"][0] == 42
    assert 1000 <= perf["spool_age"][0] < 1060
    assert perf["spool_used"][0] == 60

    only = check(config, "--metric", "spool_depth", "-w", "40", "-c", "100")
    assert only.line == "XAPI WARNING - 42 statements spooled (>= 40) | 'spool_depth'=42;40;100;0;"
    assert check(config, "--metric", "spool_used", "-w", "70", "-c", "95").code == 0

    r.hset("xapi.inflight.enc2.spool", mapping={"full": "1", "bytes": str(100 * MiB)})
    full = check(config)
    assert full.code == 2, full.line
    assert full.text.startswith(
        "XAPI CRITICAL - spool of node enc2 full: the node no longer takes from the broker; "
        "statements accumulate in Redis; spool filling: spool of node enc2 100 % used (>= 90 %)"
    )
    assert full.text.index("CRITICAL") < full.text.index("oldest statement spooled")
    # the full spool is CRITICAL with --metric spool_used, whatever the thresholds
    lenient = check(config, "--metric", "spool_used", "-w", "100", "-c", "100")
    assert lenient.code == 2 and "spool of node enc2 full" in lenient.text

    values = prometheus(config)
    broker = ("broker", "frontal1")
    for node, depth, size, is_full in (("enc1", 30, 60 * MiB, 0), ("enc2", 12, 100 * MiB, 1)):
        labels = (broker, ("node", node))
        assert values[("xapi_spool_depth", labels)] == depth
        assert values[("xapi_spool_bytes", labels)] == size
        assert values[("xapi_spool_max_bytes", labels)] == 100 * MiB
        assert values[("xapi_spool_full", labels)] == is_full
        assert values[("xapi_spool_damaged", labels)] == 0
    assert 1000 <= values[("xapi_spool_oldest_age_seconds", (broker, ("node", "enc1")))] < 1060
    assert 100 <= values[("xapi_spool_oldest_age_seconds", (broker, ("node", "enc2")))] < 160
    assert values[("xapi_statements_spooled_total", (broker,))] == 0  # no counter yet

    r.hset("xapi.metrics", "spooled", "57")
    assert prometheus(config)[("xapi_statements_spooled_total", (broker,))] == 57


def test_dead_letters_on_the_nodes_disks_are_counted_with_the_brokers_list(tmp_path, redis_srv):
    """A node with a spool keeps its dead letters on its disk and reports them in its state
    (deadstore.py): they count with the broker's list, which a node without a spool (or of
    an older release) still writes; a node whose dead letters are full stops taking (full)."""
    r = redis_srv.client()
    now = time.time()
    set_node(r, "enc1", dead_letters=7, dead_new=2, dead_oldest=now - 5000, dead_full=0)
    set_node(r, "enc2", dead_letters=3, dead_new=0, dead_oldest=now - 90000, dead_full=0)
    long_ago = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 172800))
    recent = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 60))
    for when in (long_ago, recent):
        r.rpush("xapi.dead_letters", json.dumps({"statement": {}, "reason": "x", "time": when}))
    config = write(tmp_path, {"brokers": [broker_entry(redis_srv.port)], "nodes_expected": 2})
    result = check(config)
    assert result.code == 1, result.line
    perf = result.perf()
    assert perf["dead_letters"][0] == 7 + 3 + 2
    assert perf["dead_new"][0] == 2 + 0 + 1
    assert "12 dead letters (3 new)" in result.text
    # dead letters full: the node's state says full, CRITICAL as a full spool
    r.hset("xapi.inflight.enc2.spool", mapping={"full": "1", "dead_full": "1"})
    full = check(config)
    assert full.code == 2 and "spool of node enc2 full" in full.text, full.line


def test_spool_stale_and_damaged(tmp_path, redis_srv):
    r = redis_srv.client()
    now = time.time()
    set_node(r, "enc1", updated=now - 300)  # the worker stopped reporting, heartbeat alive
    names = [f"enc2.sqlite3.damaged-2026120{n}T000000Z" for n in range(1, 6)]
    # the set-aside files, named, counted and dated (a hostile name made plain)
    set_node(
        r,
        "enc2",
        damaged=5,
        damaged_files=" ".join([*names[:4], "a\x1b[2Jb"]),
        damaged_since=now - 3 * 86400,
    )
    set_node(r, "enc3", alive=False, updated=now - 3000)  # a stopped node: old, not stale
    config = write(tmp_path, {"brokers": [broker_entry(redis_srv.port)], "nodes_expected": 2})
    result = check(config)
    assert result.code == 1, result.line
    assert result.text.startswith("XAPI WARNING - spool state of node enc1 stale (updated 30")
    assert "while its heartbeat is alive)" in result.text
    assert (
        "5 damaged spool files set aside on node enc2, the oldest 3.0 d ago "
        f"({names[0]}, {names[1]}, {names[2]}, and 2 more): their statements wait; run "
        "`xapi-worker spool drain` on its host"
    ) in result.text
    assert "enc3" not in result.text
    values = prometheus(config)
    assert values[("xapi_spool_damaged", (("broker", "frontal1"), ("node", "enc2")))] == 5
    assert (
        values[("xapi_spool_oldest_age_seconds", (("broker", "frontal1"), ("node", "enc1")))] == 0
    )


def test_spool_thresholds_in_the_configuration(tmp_path, redis_srv):
    set_node(redis_srv.client(), "enc1", depth=5, oldest=time.time() - 10, bytes=MiB)
    strict = {"spool_depth": [1, 5], "spool_age": [5, 3600], "spool_used": [0, 1]}
    config = write(tmp_path, {"brokers": [broker_entry(redis_srv.port)], "thresholds": strict})
    result = check(config)
    assert result.code == 2, result.line
    assert result.text.startswith("XAPI CRITICAL - 5 statements spooled (>= 5); spool filling: ")
    assert "oldest statement spooled 1" in result.text
    wrong = {"brokers": [broker_entry(redis_srv.port)], "thresholds": {"spool_used": [90, 50]}}
    assert check(write(tmp_path, wrong, "w.json")).code == 3


# --- hostile keys and messages (security review, round two, finding 6) ---------------------
def test_metric_fields_with_line_breaks_make_no_label(tmp_path, redis_srv):
    """A field of the metrics hash whose bound or status ends with a line break (float() takes
    it) used to become a label holding one: node_exporter then drops the whole file."""
    r = redis_srv.client()
    set_node(r, "enc1", depth=0)
    r.hset(
        "xapi.metrics",
        mapping={
            "batch_size_bucket:1": "3",
            "batch_size_bucket:1\n": "4",
            "batch_size_bucket: 2": "4",
            "batch_size_bucket:1e+400": "4",  # inf: node_exporter's parser refuses the label
            "batch_size_bucket:+Inf": "5",
            "batch_size_count": "5",
            "lrs_responses:200": "2",
            "lrs_responses:200\n": "9",
            "lrs_responses:\u0662\u0660\u0660": "9",  # digits, not ASCII ones
        },
    )
    config = write(tmp_path, {"brokers": [broker_entry(redis_srv.port)]})
    proc = subprocess.run(
        [PYTHON, "-I", str(PLUGIN), "-C", str(config), "--prometheus", "-"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        check=True,
    )
    for line in proc.stdout.splitlines():
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+\{[^\n]*\} \S+", line), line
    values = prometheus(config)
    broker = ("broker", "frontal1")
    assert values[("xapi_batch_size_bucket", (broker, ("le", "1")))] == 3
    assert values[("xapi_batch_size_bucket", (broker, ("le", "+Inf")))] == 5
    assert values[("xapi_lrs_responses_total", (broker, ("status", "200")))] == 2
    assert len([k for k in values if k[0] == "xapi_lrs_responses_total"]) == 1
    assert len([k for k in values if k[0] == "xapi_batch_size_bucket"]) == 2


def test_a_deeply_nested_message_keeps_no_worker_consumes_critical(tmp_path, redis_srv, ralph):
    """Anyone may queue a message nested past the JSON parser's stack: the oldest queued one
    used to turn the check's answer into UNKNOWN (RecursionError), hiding that no worker
    consumes the queue."""
    r = redis_srv.client()
    nested = "[" * 200_000 + "]" * 200_000
    r.lpush("xapi", nested)  # LINDEX -1: the oldest, the one whose time is read
    with pod_producer(redis_srv.url()) as delay:
        for n in range(6):
            delay(fresh(n, age=400))
    config = {
        "brokers": [broker_entry(redis_srv.port)],
        "lrs": lrs_entry(ralph.url),
        "thresholds": {"queue": [5, 100]},
    }
    result = check(write(tmp_path, config))
    assert result.code == 2, result.line
    assert "no worker consumes (queue 7, 0 worker nodes alive)" in result.text, result.line


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", (1.0, "1")), ("+Inf", (float("inf"), "+Inf")), ("0.5", (0.5, "0.5"))]
    + [(text, None) for text in ("1e+400", "1\n", " 2", "-1", "inf", "nan")],
)
def test_histogram_bounds_as_the_worker_writes_them(text, expected):
    """Only a finite bound (or +Inf) becomes a label: 1e+400 reads as inf, and node_exporter's
    parser refuses such a label, then drops every series of the file."""
    assert _le(text) == expected
