"""The second run of site.yml on the converged demo lab, side by side, in one run.

    python bench/second_run.py [--rounds 3] [--before REV]

Variants, timed in turn round after round (so that a slow minute of the machine hits them
all alike): this tree through the lab's connection entering the containers with nsenter
(the default), this tree through `podman exec` (XAPI_LAB_NSENTER=0), and, with --before, the
tree of REV (a temporary git worktree) through `podman exec`, which is all it had. Each run
must report changed=0 on every host (after one untimed warm-up run per variant: a tree's
first run builds its wheel on the controller); the table gives the median wall time and the
task results. The lab must be up and converged (`make demo`).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def second_run(tree: Path, nsenter: bool, warm_up: bool = False) -> tuple[float, str]:
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(tree / "ansible.cfg"),
        CONTAINERS_CONF=str(REPO / "lab" / "containers.conf"),
        XAPI_LAB_NSENTER="1" if nsenter else "0",
        ANSIBLE_NOCOLOR="1",
    )
    started = time.monotonic()
    done = subprocess.run(
        ["ansible-playbook", "-i", "inventories/lab", "site.yml"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    recap = re.findall(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)", done.stdout, re.M)
    if done.returncode != 0 or (not warm_up and any(changed != "0" for _, _, changed in recap)):
        raise SystemExit(
            f"{tree}: not a clean second run (rc {done.returncode}):\n{done.stdout[-3000:]}"
        )
    return seconds, ", ".join(f"{host} ok={ok}" for host, ok, _ in recap)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="a revision to time beside this tree (podman exec)")
    args = parser.parse_args()
    variants: list[tuple[str, Path, bool]] = [
        ("this tree, nsenter", REPO, True),
        ("this tree, podman exec", REPO, False),
    ]
    scratch = None
    if args.before:
        scratch = Path(tempfile.mkdtemp(prefix="xapi-before-"))
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(scratch), args.before],
            check=True,
        )
        for venv in (".venv",):
            (scratch / venv).symlink_to(REPO / venv)
        variants.append((f"{args.before}, podman exec", scratch, False))
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    results: dict[str, str] = {}
    try:
        # Untimed: a tree's first run builds its wheel on the controller (a change).
        for _name, tree, nsenter in variants:
            second_run(tree, nsenter, warm_up=True)
        for _ in range(args.rounds):
            for name, tree, nsenter in variants:
                seconds, results[name] = second_run(tree, nsenter)
                times[name].append(seconds)
                print(f"{name}: {seconds:.1f} s", flush=True)
    finally:
        if scratch:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(scratch)], check=False
            )
    print(f"\n| variant | median of {args.rounds} | runs | task results |\n|---|---:|---|---|")
    for name, _, _ in variants:
        runs = ", ".join(f"{t:.1f}" for t in times[name])
        print(f"| {name} | {statistics.median(times[name]):.1f} s | {runs} | {results[name]} |")


if __name__ == "__main__":
    main()
