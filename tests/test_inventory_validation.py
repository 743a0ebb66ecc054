"""Bad inventory input stops the run before any change, with a message naming the variable.

Each case runs a role's playbook in check mode against this machine (a local connection in
every group of a throw-away inventory) with one bad value: the role's argument specs or its
first assert must fail it, naming the variable.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "xapi_broker_password": "a-good-broker-password",
    "xapi_broker_producer_password": "a-good-producer-password",
    "xapi_lrs_url": "https://lrs.example.org/xAPI/statements/",
    "xapi_lrs_login": "pod",
    "xapi_lrs_password": "a-good-lrs-password",
}

CASES = [
    # check_xapi's thresholds and the monitoring user (roles/xapi_ops, roles/xapi).
    (
        "monitoring.yml",
        {"xapi_ops_check_thresholds": {"queue": [10, 5]}},
        "xapi_ops_check_thresholds.queue is [10, 5]",
    ),
    (
        "monitoring.yml",
        {"xapi_ops_check_thresholds": {"nodes": [0, 2]}},
        "xapi_ops_check_thresholds.nodes is [0, 2]",
    ),
    (
        "monitoring.yml",
        {"xapi_ops_check_thresholds": {"queue_len": [1, 2]}},
        "xapi_ops_check_thresholds has queue_len",
    ),
    (
        "monitoring.yml",
        {"xapi_ops_check_thresholds": {"dead_new": ["1", "x"]}},
        'xapi_ops_check_thresholds.dead_new is ["1", "x"]',
    ),
    (
        "monitoring.yml",
        {"xapi_ops_check_thresholds": {"queue": 10}},
        "xapi_ops_check_thresholds.queue is 10",
    ),
    ("monitoring.yml", {"xapi_broker_monitor_password": "short"}, "xapi_broker_monitor_password"),
    ("monitoring.yml", {"xapi_broker_monitor_user": "xapi"}, "xapi_broker_monitor_user"),
    # The metrics writer's account (roles/xapi_ops): never one of the site's or the bundle's
    # own, by name (whether it exists here or not), nor any existing account the role did not
    # make (games: a system account of every Debian, standing in for a person's or a
    # service's), refused before any change.
    *(
        (
            "monitoring.yml",
            {
                "xapi_broker_monitor_password": "a-good-monitor-password",
                "xapi_ops_metrics_user": user,
            },
            f'xapi_ops_metrics_user is "{user}": it must be an account of its own, none of the',
        )
        for user in ("root", "pod", "redis", "www-data", "xapi-worker", "nobody")
    ),
    (
        "monitoring.yml",
        {
            "xapi_broker_monitor_password": "a-good-monitor-password",
            "xapi_ops_metrics_user": "games",
        },
        "xapi_ops_metrics_user (games) names an existing account that this role did not make",
    ),
    ("redis.yml", {"xapi_broker_db": "42"}, "xapi_broker_db"),
    ("redis.yml", {"xapi_broker_firewall_enabled": "maybe"}, "xapi_broker_firewall_enabled"),
    ("redis.yml", {"xapi_broker_maxmemory": "lots"}, "xapi_broker_maxmemory"),
    ("redis.yml", {"xapi_broker_maxmemory": "0"}, "xapi_broker_maxmemory"),
    ("redis.yml", {"xapi_broker_maxmemory": "512 mb"}, "xapi_broker_maxmemory"),
    ("redis.yml", {"xapi_broker_maxmemory": "512mb\nrequirepass x"}, "xapi_broker_maxmemory"),
    # The worker's spool (roles/xapi_encodage): its directory reaches worker.env and the
    # unit's ReadWritePaths=, and root creates it.
    ("xapi_encodage.yml", {"xapi_encodage_spool_enabled": "maybe"}, "xapi_encodage_spool_enabled"),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_spool_dir": "/var/lib/spool\nReadWritePaths=/etc"},
        "xapi_encodage_spool_dir",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_spool_dir": '/var/lib/x"; touch /tmp/pwned; "'},
        "xapi_encodage_spool_dir",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_spool_dir": "/var/lib/celeryd-xapi/../../../etc"},
        "xapi_encodage_spool_dir",
    ),
    ("xapi_encodage.yml", {"xapi_encodage_spool_dir": "var/lib/spool"}, "xapi_encodage_spool_dir"),
    ("xapi_encodage.yml", {"xapi_encodage_spool_dir": "/spool"}, "xapi_encodage_spool_dir"),
    # pod would own the directory of the worker's settings, or the directory above its venv.
    (
        "xapi_encodage.yml",
        {"xapi_encodage_spool_dir": "/etc/celeryd-xapi"},
        "neither inside nor above xapi_encodage_worker_config",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_spool_dir": "/opt"},
        "xapi_encodage_spool_dir",
    ),
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_spool_dir": "/opt/spool-of/x",
            "xapi_encodage_worker_venv": "/opt/spool-of",
        },
        "neither inside nor above xapi_encodage_worker_venv",
    ),
    # A parent anyone may write to (/tmp): refused by the look at the path, before any change.
    (
        "xapi_encodage.yml",
        {"xapi_encodage_spool_dir": "/tmp/xapi-spool", "xapi_encodage_spool_enabled": True},
        "writable by others than root: /tmp.",
    ),
    ("xapi_encodage.yml", {"xapi_encodage_spool_max_mb": -1}, "xapi_encodage_spool_max_mb"),
    ("xapi_encodage.yml", {"xapi_encodage_spool_max_mb": "lots"}, "xapi_encodage_spool_max_mb"),
    # under four batches of the largest statements (104 MiB with batches of 100)
    ("xapi_encodage.yml", {"xapi_encodage_spool_max_mb": 64}, "at least 104: four batches"),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_retry_after_max_seconds": 0},
        "xapi_encodage_retry_after_max_seconds is 0",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_retry_after_max_seconds": 90000},
        "xapi_encodage_retry_after_max_seconds is 90000",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_max_statement_kb": 2048},
        "xapi_encodage_max_statement_kb is 2048",
    ),
    # the minimum follows the largest statement: 4 x 100 x (1024 + 8) KiB = 404 MiB
    (
        "xapi_encodage.yml",
        {"xapi_encodage_max_statement_kb": 1024, "xapi_encodage_spool_max_mb": 200},
        "at least 404: four batches",
    ),
    # the dead letters' limit (512 by default) fills the same file: 512 + 104 at least
    (
        "xapi_encodage.yml",
        {"xapi_encodage_spool_max_mb": 200},
        "xapi_encodage_spool_max_mb is 200 and xapi_encodage_dead_letter_max_mb 512",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_dead_letter_retention_days": -3},
        "xapi_encodage_dead_letter_retention_days",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_settings": {"XAPI_WORKER_SPOOL_DIR": "/tmp"}},
        "not from xapi_encodage_worker_settings",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_service_manager": "upstart"},
        "xapi_encodage_service_manager",
    ),
    ("xapi_encodage.yml", {"xapi_encodage_worker_app": "other"}, "xapi_encodage_worker_app"),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_watchdog_sec": 10},
        "xapi_encodage_worker_watchdog_sec is 10: the watchdog is 0 (none) or at least 45 s",
    ),
    (
        "xapi_frontal.yml",
        {"xapi_frontal_authenticated_name": "nickname"},
        "xapi_frontal_authenticated_name",
    ),
    ("xapi_frontal.yml", {"xapi_lrs_url": "ftp://lrs.example.org/"}, "xapi_lrs_url"),
    ("xapi_frontal.yml", {"xapi_lrs_password": None}, "xapi_lrs_password"),
    # Hostile values that would reach root-read files: a shell-sourced defaults file (sysv),
    # redis-xapi.conf and the ACL file, one directive or user per line.
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_extra_options": ["--foo=$(touch /tmp/pwned)"]},
        "must be plain options",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_extra_options": ['--a="x" `id`']},
        "must be plain options",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_pod_dir": '/usr/local/pod"; touch /tmp/pwned; "'},
        "xapi_encodage_pod_dir",
    ),
    ("xapi_encodage.yml", {"xapi_encodage_pod_user": "pod;id"}, "system user names"),
    # Pod's version and the upgrade (roles/xapi_encodage_pod): an upgrade names both ends,
    # versions reach git's argv (no option), and a host without Pod needs a version named.
    (
        "xapi_encodage.yml",
        {"xapi_encodage_pod_upgrade_to": "4.4.0", "xapi_encodage_worker_ip_filter": False},
        "xapi_encodage_pod_upgrade_from and xapi_encodage_pod_upgrade_to go together",
    ),
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_pod_upgrade_from": "--upload-pack=touch /tmp/pwned",
            "xapi_encodage_pod_upgrade_to": "4.4.0",
            "xapi_encodage_worker_ip_filter": False,
        },
        'xapi_encodage_pod_upgrade_from ("--upload-pack=touch /tmp/pwned") must be a tag',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_pod_version": "", "xapi_encodage_worker_ip_filter": False},
        "set xapi_encodage_pod_version to the Pod release your frontal runs",
    ),
    # Issue 32's review: `from` names where the checkout is (never a symbolic ref), and every
    # operator value reaching git's or pip's command line is checked before any change.
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_pod_upgrade_from": "HEAD",
            "xapi_encodage_pod_upgrade_to": "4.4.0",
            "xapi_encodage_worker_ip_filter": False,
        },
        'xapi_encodage_pod_upgrade_from ("HEAD") is a symbolic ref',
    ),
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_pod_repo": "--upload-pack=touch /tmp/pwned",
            "xapi_encodage_worker_ip_filter": False,
        },
        'xapi_encodage_pod_repo ("--upload-pack=touch /tmp/pwned") must be',
    ),
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_pod_repo": "ext::sh -c touch% /tmp/pwned",
            "xapi_encodage_worker_ip_filter": False,
        },
        'xapi_encodage_pod_repo ("ext::sh -c touch% /tmp/pwned") must be',
    ),
    # The pod5 review: values matched whole (a `$` let one trailing line break through), and
    # repositories over transports that authenticate nothing refused unless allowed.
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_pod_repo": "https://github.com/EsupPortail/Esup-Pod.git\n",
            "xapi_encodage_worker_ip_filter": False,
        },
        'xapi_encodage_pod_repo ("https://github.com/EsupPortail/Esup-Pod.git\\n") must be',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_pod_version": "4.4.0\n", "xapi_encodage_worker_ip_filter": False},
        'xapi_encodage_pod_version ("4.4.0\\n") must be a tag',
    ),
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_pod_upgrade_from": "4.1.0",
            "xapi_encodage_pod_upgrade_to": "0123456789abcdef0123456789abcdef01234567\n",
            "xapi_encodage_worker_ip_filter": False,
        },
        'xapi_encodage_pod_upgrade_to ("0123456789abcdef0123456789abcdef01234567\\n") must be',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_pod_python": "/usr/bin/python3\n", "xapi_encodage_worker_ip_filter": False},
        'xapi_encodage_pod_python "/usr/bin/python3\\n"',
    ),
    *(
        (
            "xapi_encodage.yml",
            {"xapi_encodage_pod_repo": repo, "xapi_encodage_worker_ip_filter": False},
            f'xapi_encodage_pod_repo ("{repo}") uses {repo.split(":")[0]}://, which authenticates',
        )
        for repo in ("http://git.example.org/Esup-Pod.git", "git://git.example.org/Esup-Pod.git")
    ),
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_pod_repo": "https://deploy:s3cr3t-t0ken@git.example.org/Esup-Pod.git\n",
            "xapi_encodage_worker_ip_filter": False,
        },
        'xapi_encodage_pod_repo ("https://***@git.example.org/Esup-Pod.git\\n") must be',
    ),
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_pod_python": "/usr/bin/python3 -c 'import os'",
            "xapi_encodage_worker_ip_filter": False,
        },
        "xapi_encodage_pod_python",
    ),
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_pod_constraints_dest": "/tmp/c.txt --index-url=http://evil.example/",
            "xapi_encodage_worker_ip_filter": False,
        },
        "xapi_encodage_pod_constraints_dest",
    ),
    (
        "xapi_frontal.yml",
        {"xapi_frontal_venv": "home/pod/venv", "xapi_frontal_public_host": "pod.example.org"},
        "xapi_frontal_venv must be an absolute path",
    ),
    (
        "xapi_frontal.yml",
        {"xapi_frontal_user": "pod;id", "xapi_frontal_public_host": "pod.example.org"},
        'xapi_frontal_user ("pod;id")',
    ),
    # The frontal's public host name (roles/xapi_frontal): Pod would answer 200 and drop
    # every statement of a site reached by such a name (docs/upstream-facts.md §1.6).
    ("xapi_frontal.yml", {"xapi_frontal_public_host": "host:8000"}, "it has a port (:8000)"),
    ("xapi_frontal.yml", {"xapi_frontal_public_host": "frontal"}, "it has no dot"),
    ("xapi_frontal.yml", {"xapi_frontal_public_host": "pod.test"}, "reserved name .test"),
    ("xapi_frontal.yml", {"xapi_frontal_public_host": "192.0.2.7"}, "ends in a number"),
    # Round two, finding 5: the sysv directories and the CA bundle's path reach the same
    # root-sourced /etc/default/celeryd-xapi (`sh -n` lets `$(...)` through).
    (
        "xapi_encodage.yml",
        {"xapi_encodage_sysv_log_dir": "/var/log/$(touch /tmp/pwned)"},
        "xapi_encodage_sysv_log_dir",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_sysv_pid_dir": '/run/celery"; touch /tmp/pwned; "'},
        "xapi_encodage_sysv_pid_dir",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_ca_bundle_path": "/etc/ssl/`id`.pem"},
        "Refused: xapi_ca_bundle_path",
    ),
    (
        "xapi_frontal.yml",
        {"xapi_ca_bundle_path": "/etc/ssl/x.pem\nexport LD_PRELOAD=/tmp/x.so"},
        "Refused: xapi_ca_bundle_path",
    ),
    # The worker's own user and group (issue 34's review, M3): the role's own or none yet,
    # refused before any change. games: an existing account the role did not make, whose
    # primary group is games (Pod's user in the worker's group: a test of its own below).
    *(
        (
            "xapi_encodage.yml",
            {"xapi_encodage_worker_user": user},
            f'xapi_encodage_worker_user is "{user}": it must be an account of its own',
        )
        for user in ("www-data", "redis", "nobody", "xapi-metrics")
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_sysv_log_dir": "/var/log/celery"},
        'xapi_encodage_sysv_log_dir is "/var/log/celery": that is',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_sysv_pid_dir": "/run/celery/"},
        'xapi_encodage_sysv_pid_dir is "/run/celery/": that is',
    ),
    # The spool's path rule for the sysv directories (session 5's review, M1): a one-level
    # directory (/run), a `.` or `..` part (past the unnormalised denylist).
    (
        "xapi_encodage.yml",
        {"xapi_encodage_sysv_pid_dir": "/run"},
        'xapi_encodage_sysv_pid_dir is "/run": it must be an absolute path',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_sysv_pid_dir": "/run/./celery"},
        'xapi_encodage_sysv_pid_dir is "/run/./celery": it must be an absolute path',
    ),
    # The log directory inside the pid directory (readable by all) or the same one (the
    # review of sec5, N2).
    (
        "xapi_encodage.yml",
        {"xapi_encodage_sysv_log_dir": "/run/celeryd-xapi/log"},
        'xapi_encodage_sysv_pid_dir is "/run/celeryd-xapi": the same directory or one inside',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_sysv_log_dir": "/srv/xapi", "xapi_encodage_sysv_pid_dir": "/srv/xapi"},
        'xapi_encodage_sysv_pid_dir is "/srv/xapi": the same directory or one inside',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_sysv_log_dir": "/var/log/celeryd-xapi/../../../etc"},
        'xapi_encodage_sysv_log_dir is "/var/log/celeryd-xapi/../../../etc": it must be',
    ),
    # Existing directories of the site (outside review, M4): an empty root directory as the
    # spool, /etc as the settings' directory, the init script's defaults as the settings.
    (
        "xapi_encodage.yml",
        {"xapi_encodage_spool_dir": "/usr/local/sbin"},
        "or a directory of neither xapi-worker nor pod",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_config": "/etc/worker.env"},
        'xapi_encodage_worker_config is "/etc/worker.env": on',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_config": "/etc/default/celeryd-xapi"},
        'xapi_encodage_worker_config is "/etc/default/celeryd-xapi": on',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_user": "games"},
        'xapi_encodage_worker_user is "games": an existing account',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_group": "games"},
        'xapi_encodage_worker_group is "games": an existing group',
    ),
    # Variables renamed when Pod's part became roles/xapi_encodage_pod: refused by that role
    # (reached once the worker's read-only steps pass: no IP allow list to resolve here).
    (
        "xapi_encodage.yml",
        {"xapi_encodage_venv": "/srv/venv", "xapi_encodage_worker_ip_filter": False},
        "xapi_encodage_venv -> xapi_encodage_pod_venv",
    ),
    # IPAddressAllow= of the worker's units: addresses and prefixes only (a name would be
    # dropped by systemd, a space or a line break would add entries).
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_ip_allow_extra": ["proxy.example.org"]},
        "xapi_encodage_worker_ip_allow_extra holds IP addresses",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_ip_allow_extra": ["192.0.2.10\nIPAddressAllow=any"]},
        "xapi_encodage_worker_ip_allow_extra holds IP addresses",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_ip_allow_extra": ["0.0.0.0/0"]},
        "xapi_encodage_worker_ip_allow_extra holds IP addresses",
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_ip_filter": "maybe"},
        "xapi_encodage_worker_ip_filter",
    ),
    ("redis.yml", {"xapi_broker_bind": ["-127.0.0.1\nrequirepass x"]}, "xapi_broker_bind holds IP"),
    ("redis.yml", {"xapi_broker_bind": ["-$(id)"]}, "xapi_broker_bind holds IP"),
    ("redis.yml", {"xapi_broker_user": "xapi on +@all ~*"}, "user names are made of"),
    # The producer's own user (security review point 4): distinct, plain, narrow.
    ("xapi_frontal.yml", {"xapi_broker_producer_password": None}, "xapi_broker_producer_password"),
    (
        "xapi_frontal.yml",
        {"xapi_broker_producer_password": "short"},
        "xapi_broker_producer_password",
    ),
    ("xapi_frontal.yml", {"xapi_broker_producer_user": "xapi"}, "must differ from"),
    ("redis.yml", {"xapi_broker_producer_user": "default"}, "must differ from"),
    ("redis.yml", {"xapi_broker_producer_user": "p on ~* +@all"}, "xapi_broker_producer_user"),
    # A trailing newline passed the rules anchored with `$` (the review of sec5, N5): every
    # rule ends in \Z now.
    (
        "redis.yml",
        {"xapi_broker_producer_user": "xapi-producer\n"},
        'xapi_broker_producer_user is "xapi-producer\\n": it must be made of',
    ),
    (
        "xapi_encodage.yml",
        {"xapi_encodage_worker_user": "xapi-worker\n"},
        'xapi_encodage_worker_user is "xapi-worker\\n": user and group names',
    ),
    (
        "monitoring.yml",
        {"xapi_ops_metrics_user": "xapi-metrics\n"},
        'xapi_ops_metrics_user is "xapi-metrics\\n": it must be a system',
    ),
    (
        "redis.yml",
        {"xapi_broker_producer_acl_commands": ["lpush", "evalsha", "script|load"]},
        "none of EVAL/EVALSHA/SCRIPT",
    ),
    ("redis.yml", {"xapi_broker_producer_acl_commands": ["@all"]}, "plain command names"),
    (
        "redis.yml",
        {"xapi_broker_producer_acl_keys": ["%W~xapi", "&*"]},
        'xapi_broker_producer_acl_keys has "&*": the producer',
    ),
    # The move from Pod's Redis sends no password of the bundle's there (round two, finding 1).
    (
        "redis.yml",
        {"xapi_broker_migrate_from_password": GOOD["xapi_broker_password"]},
        "xapi_broker_migrate_from_password is a bundle password",
    ),
    (
        "redis-migrate.yml",
        {"xapi_broker_migrate_from_password": GOOD["xapi_lrs_password"]},
        "xapi_broker_migrate_from_password is a bundle password",
    ),
    ("redis.yml", {"xapi_broker_migrate_from_user": "x on +@all"}, "xapi_broker_migrate_from_user"),
    (
        "redis.yml",
        {"xapi_broker_migrate_from_unit": "redis-server"},
        "xapi_broker_migrate_from_unit",
    ),
    (
        "redis.yml",
        {
            "xapi_broker_acl_extra_users": [
                {"name": "mon", "password": "a" * 16, "rules": "+ping\nuser x on"}
            ]
        },
        "ACL rules hold no line break",
    ),
]


# Several rules broken at once: each is named on a line of its own, with its value (one rule
# per check, the whole list in one failure, before any change).
BROKEN_TOGETHER = [
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_worker_nodes": ["a b", "a b"],
            "xapi_encodage_worker_concurrency": 0,
            "xapi_encodage_worker_time_limit": 5,
            "xapi_encodage_worker_prefetch_multiplier": 1,
            "xapi_encodage_worker_settings": {"BAD": "1", "XAPI_WORKER_SPOOL_DIR": "/x"},
            "xapi_encodage_spool_max_mb": -1,
            "xapi_encodage_dead_letter_retention_days": -3,
            "xapi_encodage_worker_watchdog_sec": 10,
        },
        [
            'xapi_encodage_worker_nodes is ["a b", "a b"]: each name must be distinct',
            '"a b", "a b" must be made of letters, digits',
            "xapi_encodage_worker_concurrency is 0: it must be at least 1",
            "xapi_encodage_worker_time_limit is 5: the bundled worker",
            "xapi_encodage_worker_prefetch_multiplier is 1 (with "
            "xapi_encodage_worker_concurrency 0)",
            'xapi_encodage_worker_settings has the keys "BAD"',
            "xapi_encodage_worker_settings has XAPI_WORKER_SPOOL_DIR: the spool",
            "xapi_encodage_spool_max_mb is -1",
            "xapi_encodage_dead_letter_retention_days is -3",
            "xapi_encodage_worker_watchdog_sec is 10",
        ],
    ),
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_worker_app": "pod",
            "xapi_encodage_with_pod": False,
            "xapi_encodage_worker_settings": {"XAPI_WORKER_BATCH_SIZE": 10},
            "xapi_encodage_service_manager": "sysv",
            "xapi_broker_hosts": ["192.0.2.1", "192.0.2.2"],
        },
        [
            "xapi_encodage_worker_settings is set (XAPI_WORKER_BATCH_SIZE) with "
            "xapi_encodage_worker_app pod",
            "xapi_encodage_with_pod is false on localhost",
            "xapi_encodage_worker_app is pod and xapi_encodage_service_manager sysv, "
            "with 2 brokers",
        ],
    ),
    (
        "xapi_encodage.yml",
        {
            "xapi_encodage_worker_user": "root",
            "xapi_encodage_worker_group": "root",
            "xapi_encodage_worker_venv": "opt/x",
            "xapi_encodage_pod_group": "Pod!",
        },
        [
            'xapi_encodage_worker_user is "root": the worker',
            'xapi_encodage_worker_group is "root": the worker',
            'xapi_encodage_worker_venv is "opt/x": it must be an absolute path',
            'xapi_encodage_pod_group is "Pod!": user and group names must be system user names',
        ],
    ),
    (
        "redis.yml",
        {
            "xapi_broker_password": "short",
            "xapi_broker_monitor_user": "xapi-producer",
            "xapi_broker_tls": True,
        },
        [
            "xapi_broker_password has 5 characters: it must have 12 at least",
            'xapi_broker_monitor_user is "xapi-producer": it must differ',
            'xapi_broker_tls_ca is "": xapi_broker_tls needs it',
        ],
    ),
    (
        "redis.yml",
        {
            "xapi_broker_admin_password": "short",
            "xapi_broker_monitor_acl_keys": ["~xapi"],
            "xapi_broker_monitor_acl_commands": ["@read", "keys"],
            "xapi_broker_acl_extra_users": [
                {"name": "xapi", "password": "a" * 16, "rules": "+ping"},
                {"name": "xapi", "password": "b" * 16, "rules": "+ping"},
            ],
        },
        [
            "xapi_broker_admin_password has 5 characters",
            'xapi_broker_monitor_acl_keys has "~xapi": the monitoring user',
            'xapi_broker_monitor_acl_commands has "@read": the monitoring user',
            "xapi_broker_monitor_acl_commands has keys: none of EVAL",
            "xapi_broker_acl_extra_users names xapi: its users are neither",
            'xapi_broker_acl_extra_users names ["xapi", "xapi"]: each name must be unique',
        ],
    ),
    (
        "monitoring.yml",
        {
            "xapi_ops_check_timeout": 0,
            "xapi_ops_metrics_user": "root",
            "xapi_ops_metrics_file": "/tmp/x.txt",
            "xapi_ops_check_thresholds": {"queue": [10, 5], "bogus": [1, 2]},
            "xapi_ops_check_plugin_dir": "/usr/lib/nagios/../../tmp",
            "xapi_ops_check_config": "/etc/xapi monitoring.json",
        },
        [
            'xapi_ops_check_plugin_dir is "/usr/lib/nagios/../../tmp": it must be an absolute',
            'xapi_ops_check_config is "/etc/xapi monitoring.json": it must be an absolute',
            "xapi_ops_check_timeout is 0: it must be a positive whole number",
            'xapi_ops_metrics_user is "root": it must be an account of its own, none of the',
            'xapi_ops_metrics_file is "/tmp/x.txt": it must be an absolute path',
            "xapi_ops_check_thresholds.queue is [10, 5]: [warning, critical]",
            "xapi_ops_check_thresholds has bogus: its metrics are among",
        ],
    ),
    (
        "xapi_frontal.yml",
        {
            "xapi_frontal_broker_timeout": 9,
            "xapi_frontal_publish_retries": 7,
            "xapi_frontal_use_xapi": False,
        },
        [
            "xapi_frontal_broker_timeout is 9: it must be over 0 and at most 5 seconds",
            "xapi_frontal_publish_retries is 7: it must be between 0 and 5",
            "xapi_frontal_use_xapi_video is true and xapi_frontal_use_xapi false",
        ],
    ),
]


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inv") / "hosts.yml"
    groups = "".join(
        f"    {group}:\n      hosts:\n        localhost:\n"
        for group in ("pod_frontal", "pod_encodage", "xapi_broker")
    )
    path.write_text(
        "all:\n  vars:\n    ansible_connection: local\n"
        "    ansible_python_interpreter: /usr/bin/python3\n  children:\n" + groups
    )
    return path


#: useradd's options for an account as tasks/user.yml makes the worker's (account_checks.yml
#: knows it by them).
ROLES_ACCOUNT = [
    "--no-create-home",
    "--home-dir",
    "/nonexistent",
    "--shell",
    "/usr/sbin/nologin",
    "--comment",
    "xAPI worker (Esup-Pod xAPI bundle)",
]


def check_run(inventory: Path, tmp_path: Path, playbook: str, values: dict) -> tuple[int, str]:
    """``playbook`` in check mode with ``values`` as extra vars: exit status and output."""
    extra = tmp_path / "vars.yml"
    extra.write_text(
        # JSON is YAML: a "\n" in a value is a real line break there.
        "".join(
            f"{key}: {json.dumps(value)}\n" for key, value in values.items() if value is not None
        )
    )
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    result = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            str(inventory),
            "--check",
            "-e",
            f"@{extra}",
            str(ROOT / "playbooks" / playbook),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize(("playbook", "bad", "named"), CASES)
def test_bad_value_is_refused_naming_the_variable(
    inventory: Path, tmp_path: Path, playbook: str, bad: dict[str, str | bool | None], named: str
) -> None:
    returncode, output = check_run(inventory, tmp_path, playbook, {**GOOD, **bad})
    assert returncode != 0, output[-2000:]
    assert named in output, output[-2000:]
    # Refused before the role changed anything: no task reported a change.
    assert "changed=0" in output, output[-2000:]


def test_an_insecure_repository_allowed_by_the_operator_is_not_refused(
    inventory: Path, tmp_path: Path
) -> None:
    """xapi_encodage_pod_repo_allow_insecure: an http:// repository passes the check (the
    run goes on to the next one: this machine has no Pod checkout, and no version is named)."""
    values = {
        **GOOD,
        "xapi_encodage_pod_repo": "http://git.example.org/Esup-Pod.git",
        "xapi_encodage_pod_repo_allow_insecure": True,
        "xapi_encodage_pod_version": "",
        "xapi_encodage_worker_ip_filter": False,
    }
    returncode, output = check_run(inventory, tmp_path, "xapi_encodage.yml", values)
    assert "which authenticates" not in output, output[-2000:]
    assert returncode != 0 and "set xapi_encodage_pod_version" in output, output[-2000:]


def test_forget_by_an_actor_name_alone_needs_the_operators_word(
    inventory: Path, tmp_path: Path
) -> None:
    """playbooks/forget.yml -e actor_name=... alone would erase every homonym's statements
    (review of the worker, L7): refused before anything runs, naming the variable and the
    way out, never the name; with -e name_is_unique=true, or with an mbox, it passes that
    check (and stops later here: no worker is deployed on this machine)."""
    name = "Marie Dupont"
    returncode, output = check_run(inventory, tmp_path, "forget.yml", {"actor_name": name})
    flat = " ".join(output.split())
    assert returncode != 0 and "xapi_ops_forget_name (actor_name) alone" in flat, output[-2000:]
    assert "-e name_is_unique=true" in flat and name not in output
    assert "changed=0" in output, output[-2000:]
    for values in (
        {"actor_name": name, "name_is_unique": "true"},
        {"actor_name": name, "mbox": "mailto:marie.dupont@example.org"},
    ):
        returncode, output = check_run(inventory, tmp_path, "forget.yml", values)
        assert "Refuse the actor's name alone" in output, output[-2000:]
        assert "xapi_ops_forget_name (actor_name) alone" not in output, output[-2000:]
        assert name not in output and "marie" not in output.lower()


def test_real_public_host_name_is_accepted(inventory: Path, tmp_path: Path) -> None:
    """A real name passes the public-host check: the run goes on to the next one (this
    machine has no Pod, which the role names next)."""
    values = {**GOOD, "xapi_frontal_public_host": "pod.univ.example.fr"}
    returncode, output = check_run(inventory, tmp_path, "xapi_frontal.yml", values)
    assert "xapi_frontal_public_host" not in output, output[-2000:]
    assert returncode != 0 and "lacks" in output, output[-2000:]


def test_broker_without_firewall_is_warned_about(inventory: Path, tmp_path: Path) -> None:
    """xapi_broker_firewall_enabled: false used to leave the instance on the host's main address
    without a word."""
    values = {
        **GOOD,
        "xapi_broker_firewall_enabled": False,
        "xapi_broker_bind": ["127.0.0.1", "-192.0.2.7"],
    }
    _, output = check_run(inventory, tmp_path, "redis.yml", values)
    assert "WARNING: xapi_broker_firewall_enabled is false" in output, output[-2000:]
    assert "192.0.2.7" in output


def test_public_host_without_pods_validator_is_not_silent(inventory: Path, tmp_path: Path) -> None:
    """Pod's venv without email_validator (issue 32's review, gap 5): the frontal's check
    passed in silence. It now says that only the bundle's own rule checked the name, and why.
    A stand-in for Pod here: its tree, and a venv whose python (this machine's, which has no
    email_validator) runs as this user (su: root to root)."""
    pod, venv = tmp_path / "pod", tmp_path / "venv"
    (pod / "pod" / "custom").mkdir(parents=True)
    (pod / "manage.py").write_text("")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/usr/bin/python3")
    (venv / "bin" / "pip").write_text("")
    assert subprocess.run(
        ["/usr/bin/python3", "-c", "import email_validator"], check=False
    ).returncode
    values = {
        **GOOD,
        "xapi_frontal_public_host": "pod.univ.example.fr",
        "xapi_frontal_pod_dir": str(pod),
        "xapi_frontal_venv": str(venv),
        "xapi_frontal_user": "root",
        "xapi_frontal_preflight_broker": False,
        "ansible_become_method": "su",
    }
    _, output = check_run(inventory, tmp_path, "xapi_frontal.yml", values)
    assert "Check the public host name with the validator of Pod's venv" in output, output[-3000:]
    flat = " ".join(output.replace("''", "'").split())
    assert f"WARNING: Pod's venv {venv} on localhost has no email_validator" in flat, flat[-3000:]
    assert "checked with the bundle's own rule only" in flat


def connecting_uid(server: socket.socket, client: tuple[str, int]) -> int | None:
    """The uid owning the client end of a loopback connection to ``server`` (/proc/net/tcp)."""
    want = {
        f"{ipaddress.ip_address(client[0]).packed[::-1].hex().upper()}:{client[1]:04X}",
        f"{ipaddress.ip_address(server.getsockname()[0]).packed[::-1].hex().upper()}"
        f":{server.getsockname()[1]:04X}",
    }
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if {fields[1], fields[2]} == want and fields[1].endswith(f":{client[1]:04X}"):
            return int(fields[7])
    return None


def test_the_broker_check_runs_unprivileged(inventory: Path, tmp_path: Path) -> None:
    """Session 5's review, L7: the frontal's broker check parses whatever answers on the
    broker's port (an impostor is what it is there to find), and it ran as root. A listener
    here, standing in for the broker, reads which user connects to it: nobody. It refuses the
    credentials, which the run reports (the check read its answer)."""
    pod, venv = tmp_path / "pod", tmp_path / "venv"
    (pod / "pod" / "custom").mkdir(parents=True)
    (pod / "manage.py").write_text("")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/usr/bin/python3")
    (venv / "bin" / "pip").write_text("")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(170)
    seen: list[int | None] = []

    def answer() -> None:
        with contextlib.suppress(OSError):
            conn, peer = server.accept()
            with conn:
                seen.append(connecting_uid(server, peer))
                conn.recv(4096)
                conn.sendall(b"-WRONGPASS invalid username-password pair\r\n")

    listener = threading.Thread(target=answer, daemon=True)
    listener.start()
    values = {
        **GOOD,
        "xapi_frontal_public_host": "pod.univ.example.fr",
        "xapi_frontal_pod_dir": str(pod),
        "xapi_frontal_venv": str(venv),
        "xapi_frontal_user": "root",
        "xapi_broker_producer_host": "127.0.0.1",
        "xapi_broker_port": server.getsockname()[1],
        "ansible_become_method": "su",
        # nobody's shell is nologin: su is told which shell to run (sudo needs none).
        "ansible_become_flags": "-s /bin/sh",
    }
    try:
        _, output = check_run(inventory, tmp_path, "xapi_frontal.yml", values)
    finally:
        server.close()
        listener.join(5)
    assert "CREDENTIALS REFUSED (WRONGPASS)" in output, output[-3000:]
    assert seen == [pwd.getpwnam("nobody").pw_uid], seen


def test_site_refuses_the_worker_hosts_values_in_its_first_play(
    inventory: Path, tmp_path: Path
) -> None:
    """Session 5's review, L8: the encoding hosts' read-only checks ran in the encoding play,
    after the broker play had converged the broker and roles/xapi had installed the CA files,
    and their refusals said that nothing was changed. site.yml runs them in its first play,
    Pod's (passed here) first: a refused worker group stops the run there, before any other
    play."""
    values = {**GOOD, "xapi_encodage_worker_group": "games"}
    returncode, output = check_run(inventory, tmp_path, "site.yml", values)
    assert returncode != 0, output[-3000:]
    assert 'xapi_encodage_worker_group is "games": an existing group' in output, output[-3000:]
    assert (
        "TASK [xapi_encodage_pod : Check Pod's repository, version and the upgrade asked]" in output
    )
    plays = re.findall(r"^PLAY \[([^\]]*)\]", output, re.MULTILINE)
    assert plays == [
        "Gather facts of every host (addresses for the firewall, the bind and the URLs)"
    ], plays
    assert "changed=0" in output, output[-3000:]


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A directory of root's alone (not under /tmp, which all may write)."""
    path = Path(f"/root/xapi-test-{os.getpid()}")
    path.mkdir(mode=0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root (a directory of root's)")
def test_the_plugin_directory_is_checked_and_left_as_it_is(
    inventory: Path, tmp_path: Path, root_dir: Path
) -> None:
    """Session 5's review, L5: root wrote check_xapi and its modules, and ran it, in a plugin
    directory whose parents nobody checked (a group-writable one lets that group swap
    check_xapi.lib), and forced an existing one to root:root 0755. A parent writable by its
    group is refused before the monitoring changes anything, naming it; a site's directory
    that is safe keeps its owner and mode (not even in the plan)."""
    shared = root_dir / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    (shared / "plugins").mkdir(mode=0o755)
    own = root_dir / "own" / "plugins"
    own.mkdir(parents=True)
    os.chown(own, 0, grp.getgrnam("nogroup").gr_gid)
    own.chmod(0o750)
    values = {**GOOD, "xapi_broker_monitor_password": "a-good-monitor-password"}
    returncode, output = check_run(
        inventory,
        tmp_path,
        "monitoring.yml",
        {**values, "xapi_ops_check_plugin_dir": str(shared / "plugins")},
    )
    flat = " ".join(output.split())
    assert returncode != 0, output[-3000:]
    assert (
        f'xapi_ops_check_plugin_dir is "{shared}/plugins": on localhost, {shared} is a symbolic'
    ) in flat, flat[-3000:]
    assert "changed=0" in output
    returncode, output = check_run(
        inventory, tmp_path, "monitoring.yml", {**values, "xapi_ops_check_plugin_dir": str(own)}
    )
    assert returncode == 0, output[-3000:]
    assert "TASK [xapi_ops : Check that no one but root can replace" in output, output[-3000:]
    assert not re.search(rf"changed: \[localhost\][^\n]*{own}", output), output[-3000:]


@pytest.mark.parametrize(("playbook", "bad", "named"), BROKEN_TOGETHER)
def test_every_broken_rule_is_named_with_its_value(
    inventory: Path, tmp_path: Path, playbook: str, bad: dict, named: list[str]
) -> None:
    returncode, output = check_run(inventory, tmp_path, playbook, {**GOOD, **bad})
    assert returncode != 0, output[-3000:]
    # The failure's list of messages, as the run prints it (its YAML wraps long lines).
    flat = " ".join(output.split())
    missing = [message for message in named if message not in flat]
    assert not missing, f"{missing} not in:\n{output[-4000:]}"
    assert "changed=0" in output, output[-3000:]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root (makes a system account)")
@pytest.mark.parametrize("comment", ["xAPI metrics writer (esup.pod_xapi)", "", None])
def test_the_roles_own_metrics_account_is_accepted(
    inventory: Path, tmp_path: Path, comment: str | None
) -> None:
    """An account as roles/xapi_ops makes it (a system account with its comment, or none for
    one made by an earlier release, nologin, its home the unit's state directory), or none yet
    (``comment`` None: a new host), passes the check that refuses every other existing
    account."""
    name = f"xapi-m-{os.getpid()}"
    if comment is not None:
        home = ["--no-create-home", "--home-dir", "/var/lib/xapi-metrics"]
        shell = ["--shell", "/usr/sbin/nologin", "--comment", comment]
        subprocess.run(["useradd", "--system", *home, *shell, name], check=True)
    try:
        values = {
            **GOOD,
            "xapi_broker_monitor_password": "a-good-monitor-password",
            "xapi_ops_metrics_user": name,
        }
        returncode, output = check_run(inventory, tmp_path, "monitoring.yml", values)
    finally:
        if comment is not None:
            subprocess.run(["userdel", name], check=True)
    assert "Check that an existing metrics user is the role's own" in output, output[-2000:]
    assert "names an existing account" not in output, output[-2000:]
    assert returncode == 0, output[-2000:]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root (makes a system account)")
def test_a_worker_user_with_uid_0_is_refused(inventory: Path, tmp_path: Path) -> None:
    """An account that looks like the role's own in every field but has uid 0 (a second name
    for root) is refused before any change, naming the variable and the value (issue 34's
    review, M3: the worker's user was checked by name only)."""
    name = f"xapi-w0-{os.getpid()}"
    subprocess.run(
        [
            "useradd",
            "--non-unique",
            "--uid",
            "0",
            "--gid",
            "nogroup",
            *ROLES_ACCOUNT,
            name,
        ],
        check=True,
    )
    try:
        values = {**GOOD, "xapi_encodage_worker_user": name}
        returncode, output = check_run(inventory, tmp_path, "xapi_encodage.yml", values)
    finally:
        # userdel refuses a uid in use (root's): the entry is removed from the files.
        for table in ("/etc/passwd", "/etc/shadow"):
            lines = Path(table).read_text().splitlines(keepends=True)
            Path(table).write_text("".join(x for x in lines if not x.startswith(name + ":")))
    flat = " ".join(output.split())
    assert returncode != 0, output[-2000:]
    assert f'xapi_encodage_worker_user is "{name}": that account has uid 0' in flat, flat[-3000:]
    assert "changed=0" in output, output[-2000:]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root (makes a system account)")
def test_the_roles_own_worker_account_is_accepted(inventory: Path, tmp_path: Path) -> None:
    """The account and group as tasks/user.yml makes them pass the check that refuses every
    other existing account (the run goes on past it)."""
    name = f"xapi-w-{os.getpid()}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            *ROLES_ACCOUNT,
            name,
        ],
        check=True,
    )
    try:
        values = {**GOOD, "xapi_encodage_worker_user": name}
        _, output = check_run(inventory, tmp_path, "xapi_encodage.yml", values)
    finally:
        subprocess.run(["userdel", name], check=True)
    assert "Check that the worker's user and group are the role's own" in output, output[-2000:]
    assert "ok: [localhost]" in output.split("Check that the worker's user and group")[1][:400]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root (makes a system group)")
def test_a_worker_group_pods_user_is_in_is_refused(inventory: Path, tmp_path: Path) -> None:
    """A system group with no other tie than Pod's user listed as a member (nobody stands in
    for Pod's user): the group reads the worker's settings, refused before any change."""
    name = f"xapi-g-{os.getpid()}"
    subprocess.run(["groupadd", "--system", "--users", "nobody", name], check=True)
    try:
        values = {**GOOD, "xapi_encodage_worker_group": name, "xapi_encodage_pod_user": "nobody"}
        returncode, output = check_run(inventory, tmp_path, "xapi_encodage.yml", values)
    finally:
        subprocess.run(["groupdel", name], check=True)
    flat = " ".join(output.replace("''", "'").split())
    assert returncode != 0, output[-2000:]
    assert f'xapi_encodage_worker_group is "{name}": Pod\'s user (nobody) is a member' in flat
    assert "changed=0" in output, output[-2000:]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root (makes a system group)")
def test_an_existing_group_with_no_member_is_refused(inventory: Path, tmp_path: Path) -> None:
    """A system group with no member that is nobody's primary group (disk, shadow, kmem,
    staff... on Debian) passed as the worker's own, and the worker's user got its files
    (session 5's review, M3). Only the primary group of the role's own existing user is."""
    name = f"xapi-e-{os.getpid()}"
    subprocess.run(["groupadd", "--system", name], check=True)
    try:
        values = {**GOOD, "xapi_encodage_worker_group": name}
        returncode, output = check_run(inventory, tmp_path, "xapi_encodage.yml", values)
    finally:
        subprocess.run(["groupdel", name], check=True)
    flat = " ".join(output.split())
    assert returncode != 0, output[-2000:]
    assert f'xapi_encodage_worker_group is "{name}": an existing group' in flat, flat[-3000:]
    assert "that is not the one this role made for the worker" in flat, flat[-3000:]
    assert "changed=0" in output, output[-2000:]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root (makes a system account)")
def test_a_fixed_system_group_is_refused_even_as_the_roles_users_own(
    inventory: Path, tmp_path: Path
) -> None:
    """A host converged before the group rule, with a fixed system group (disk, shadow: gid
    below 100) as the worker's group and so as its user's primary group: the worker's user
    would keep that group's files (raw disks for disk). Only a dynamic system group (101-999)
    passes as the role's own (session 6's review of sec5, N3)."""

    gid = next(n for n in range(99, 50, -1) if n not in {g.gr_gid for g in grp.getgrall()})
    name = f"xapi-f-{os.getpid()}"
    subprocess.run(["groupadd", "--gid", str(gid), name], check=True)
    try:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--gid",
                name,
                *ROLES_ACCOUNT,
                name,
            ],
            check=True,
        )
        try:
            values = {
                **GOOD,
                "xapi_encodage_worker_user": name,
                "xapi_encodage_worker_group": name,
            }
            returncode, output = check_run(inventory, tmp_path, "xapi_encodage.yml", values)
        finally:
            subprocess.run(["userdel", name], check=True)
    finally:
        subprocess.run(["groupdel", name], check=False)
    flat = " ".join(output.split())
    assert returncode != 0, output[-2000:]
    assert f'xapi_encodage_worker_group is "{name}": an existing group' in flat, flat[-3000:]
    assert "changed=0" in output, output[-2000:]
