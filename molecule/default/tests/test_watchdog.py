"""systemd restarts a bundled worker stuck on a hung broker (docs/reliability.md, "What the
worker trusts"): the unit's WatchdogSec=, fed by the worker from Celery's event loop only
while its broker answers. Before, the worker stayed alive and consumed nothing."""

from __future__ import annotations

from xapi_testsupport.pod_on_host import delivered, produce
from xapi_testsupport.polling import wait_until

NODE_UNIT = "celeryd-xapi@xapi.service"
BROKER_UNIT = "redis-server@xapi.service"


def _show(host, unit: str, prop: str) -> str:
    return host.run(f"systemctl show -p {prop} --value {unit}").stdout.strip()


def test_a_worker_stuck_on_a_hung_broker_is_restarted(frontal, encodage):
    assert _show(encodage, NODE_UNIT, "WatchdogUSec") == "1min"
    restarts = int(_show(encodage, NODE_UNIT, "NRestarts"))
    since = encodage.run("date '+%Y-%m-%d %H:%M:%S'").stdout.strip()
    broker = _show(frontal, BROKER_UNIT, "MainPID")
    assert frontal.run(f"kill -STOP {broker}").rc == 0
    try:
        # 30 s without an answer, then up to 60 s without WATCHDOG=1.
        restarted = wait_until(
            lambda: int(_show(encodage, NODE_UNIT, "NRestarts")) > restarts, 150, interval=3
        )
    finally:
        frontal.run(f"kill -CONT {broker}")
    journal = encodage.run(f"journalctl -u {NODE_UNIT} --since '{since}' --no-pager").stdout
    assert restarted, journal[-3000:]
    assert "watchdog" in journal.lower(), journal[-3000:]
    assert wait_until(lambda: _show(encodage, NODE_UNIT, "ActiveState") == "active", 60)
    statement_id = produce(frontal)
    assert delivered(frontal, statement_id, 120), journal[-3000:]
