"""Two frontals, each with its own xAPI instance (TLS only), one encoding host consuming from
both: every frontal's statements are delivered, one frontal down does not stop the other's,
and the broker's certificate is verified end to end."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from conftest import FRONTALS, host
from xapi_testsupport.pod_on_host import delivered, produce
from xapi_testsupport.polling import wait_until

PORT = 6380
TLS = Path(os.environ.get("MOLECULE_EPHEMERAL_DIRECTORY", "/nonexistent")) / "tls"

# A TLS client of the instance, run on a host: argv = host, port, CA file; prints the
# outcome of the handshake and of a PING (no credentials: NOAUTH proves a Redis answered).
TLS_CLIENT = r"""
import socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.create_default_context(cafile=ca)
try:
    with socket.create_connection((host, port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=host) as s:
            s.sendall(b"PING\r\n")
            print("answered " + s.recv(100).decode().strip())
except ssl.SSLError as error:
    print("refused " + error.reason)
except OSError as error:
    print("failed " + type(error).__name__)
"""
PLAIN_CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        s.sendall(b"PING\r\n")
        print("answered " + s.recv(100).decode(errors="replace").strip())
except OSError as error:
    print("failed " + type(error).__name__)
"""


def run_client(on, code: str, *args: str, python: str = "python3") -> str:
    quoted = " ".join(shlex.quote(a) for a in args)
    return on.check_output(f"{python} -c {shlex.quote(code)} {quoted}")


def test_each_frontal_queues_into_its_own_instance_over_tls(frontal):
    text = frontal.file(
        "/usr/local/django_projects/podv4/pod/custom/settings_local.py"
    ).content_string
    line = next(x for x in text.splitlines() if x.startswith("XAPI_CELERY_BROKER_URL"))
    assert line.startswith('XAPI_CELERY_BROKER_URL = "rediss://')
    assert f"@127.0.0.1:{PORT}/6?ssl_cert_reqs=required" in line
    assert line.endswith('&ssl_check_hostname=true"')


def test_one_worker_node_per_broker(encodage):
    for node, broker in (("xapi-1", FRONTALS[0]), ("xapi-2", FRONTALS[1])):
        assert encodage.service(f"celeryd-xapi@{node}").is_running
        env = encodage.file(f"/etc/celeryd-xapi/broker-{node}.env").content_string
        assert f"@{broker}:{PORT}/" in env and "rediss://" in env


def test_statements_from_every_frontal_delivered(frontal):
    assert delivered(frontal, produce(frontal))


def test_broker_certificate_verified(encodage):
    ca = "/usr/local/share/xapi/broker-ca.pem"
    for broker in FRONTALS:
        assert run_client(encodage, TLS_CLIENT, broker, str(PORT), ca).startswith(
            "answered -NOAUTH"
        )


def test_client_trusting_another_ca_refused(encodage):
    other = "/tmp/other-ca.pem"
    subprocess.run(
        ["podman", "cp", str(TLS / "other-ca.crt"), f"multi-encodage:{other}"], check=True
    )
    out = run_client(encodage, TLS_CLIENT, FRONTALS[0], str(PORT), other)
    assert out == "refused CERTIFICATE_VERIFY_FAILED", out


# The worker's own URL and credentials, dialled at the broker's address instead of its name:
# a certificate of the right CA that does not name the host is refused (security review, 5).
WRONG_NAME_CLIENT = r"""
import re, socket, sys
import redis
text = open(sys.argv[1]).read()
url = re.search(r'XAPI_CELERY_BROKER_URL="?([^"\n]+)', text).group(1)
name = sys.argv[2]
url = url.replace(f"@{name}:", f"@{socket.gethostbyname(name)}:")
try:
    redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5).ping()
    print("answered")
except redis.ConnectionError as error:
    print(f"refused {error}")
"""


def test_certificate_for_another_name_refused(encodage):
    out = run_client(
        encodage,
        WRONG_NAME_CLIENT,
        "/etc/celeryd-xapi/broker-xapi-1.env",
        FRONTALS[0],
        python="/opt/xapi-worker/bin/python",
    )
    assert out.startswith("refused") and "mismatch" in out, out


def test_no_clear_text_port(encodage):
    out = run_client(encodage, PLAIN_CLIENT, FRONTALS[0], str(PORT))
    assert "NOAUTH" not in out and "PONG" not in out, out


def test_status_covers_every_broker(playbook):
    result = playbook("status.yml")
    assert result.returncode == 0, result.stdout[-3000:]
    assert result.stdout.count("broker and LRS       OK") == 2
    assert "xapi-1@multi-encodage" in result.stdout and "xapi-2@multi-encodage" in result.stdout


def test_one_frontal_down_the_other_still_delivered():
    """Last: frontal1 is stopped whole, then started again."""
    down, up = FRONTALS
    subprocess.run(["podman", "stop", "-t", "30", down], check=True, capture_output=True)
    try:
        survivor = host(up)
        ids = [produce(survivor) for _ in range(5)]
        assert all(delivered(survivor, i) for i in ids)
    finally:
        subprocess.run(["podman", "start", down], check=True, capture_output=True)
    back = host(down)
    booted = wait_until(
        lambda: back.run("systemctl is-active redis-server@xapi uwsgi-pod").rc == 0, 120
    )
    assert booted, back.run("systemctl status redis-server@xapi --no-pager").stdout
    # Its node on the encoding host finds it again, and its statements flow.
    assert delivered(back, produce(back), timeout=120)
