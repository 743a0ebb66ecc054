"""Renders bench/results/latest.json into docs/benchmarks.md (the section between the
`bench:pipeline` markers; the rest of the page is kept) and the chart
docs/benchmarks-pipeline.png, and a run's spool and dead-letter phases into their sections.
The chart needs matplotlib (bench/requirements.txt, .venv-bench); the other sections only
the standard library."""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
CHART = REPO / "docs" / "benchmarks-pipeline.png"
START, END = "<!-- bench:pipeline:start -->", "<!-- bench:pipeline:end -->"
SPOOL_START, SPOOL_END = "<!-- bench:spool:start -->", "<!-- bench:spool:end -->"
SPOOL_CONFIGS = {"spool", "spoolbefore", "cspool"}
DEAD_START, DEAD_END = "<!-- bench:dead:start -->", "<!-- bench:dead:end -->"
# Runs of no pipeline configuration: their own sections.
APART = SPOOL_CONFIGS | {"dead"}
MIB = 1024**2
# Issue #17's goals: the drain of a spool against (c) on a store of the same size, and the
# worker's CPU per delivered statement on the encoding host (main + pool processes).
DRAIN_SHARE = 0.9
CPU_MS = 0.3


def chart(runs: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt  # after the backend choice

    labels = [r["label"] for r in runs]
    rates = [r["statements_per_s"] for r in runs]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    bars = ax.barh(labels, rates, color=["#c44" if r["config"] == "a" else "#48a" for r in runs])
    ax.bar_label(bars, labels=[f"{v:g}" for v in rates], padding=3)
    ax.invert_yaxis()
    ax.set_xlabel("statements/s, frontal enqueue -> stored in Ralph (higher is better)")
    ax.set_xlim(0, max(rates) * 1.15)
    fig.tight_layout()
    fig.savefig(CHART)


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def section(res: dict[str, Any]) -> str:
    runs = {r["config"]: r for r in res["runs"]}
    m = res["machine"]
    lines = [
        START,
        "## Deployed pipeline (`make bench`)",
        "",
        f"Measured {res['date'][:10]} with `{res['command']}` on this machine: "
        f"{m['nproc']} cores ({m['cpu']}), {m['ram_gib']} GiB RAM, Debian {m['os']}; lab hosts "
        "are podman containers (systemd) on it, so workers, Redis, Ralph and the producer share "
        "the same 2 cores. Raw results: `bench/results/latest.json` (logs of every playbook "
        "run in `bench/results/logs/`, not committed).",
        "",
        f"Each run: {res['n']:,} w3id video statements queued in one burst on the frontal "
        "with Pod's own `send_xapi_statement_task.delay()` (as user pod, Pod's venv), timed "
        "until Ralph has stored the last one. Statements/s = stored / (last `stored` stamp - "
        "first enqueue). Latency = Ralph's `stored` stamp - the statement's enqueue time (one "
        "kernel clock), so under a burst it is mostly time spent waiting in the queue. Worker "
        "RSS = peak (1 s samples) of the summed RSS of the Celery processes on the encoding "
        "host(s). Ralph's store and history are emptied before each run (FS backend, "
        f"docs/upstream-facts.md §5.3). (c) POSTs batches of {res['direct_batch']} from the "
        "frontal to Ralph, no queue. Each configuration is deployed by the bundle "
        "(`bench/configs/*.yml` as extra vars of `playbooks/xapi_encodage.yml`; 2 hosts: "
        "`site.yml` with "
        "`bench/inventory/two-encodage.yml`).",
        "",
        "| configuration | stored | seconds | statements/s | p50 latency | p99 latency "
        "| worker RSS (peak) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        bound = "" if r["complete"] else "≥ "
        rss = f"{r['worker_rss_peak_mib']} MiB" if r["worker_rss_peak_mib"] else "—"
        p50, p99 = (
            (f"{bound}{r[k] / 1000:.2f} s" if r[k] is not None else "—")
            for k in ("latency_p50_ms", "latency_p99_ms")
        )
        lines.append(
            f"| {r['label']} | {r['stored']:,} / {r['n']:,} | {r['seconds']} "
            f"| {r['statements_per_s']:g} | {p50} | {p99} | {rss} |"
        )
    lines += ["", "![statements/s per configuration](benchmarks-pipeline.png)", ""]
    if "a" in runs and not runs["a"]["complete"]:
        a = runs["a"]
        lines += [
            f"(a) is time-boxed ({res['seed_window_s']:.0f} s, `--seed-window`): it stored "
            f"{a['stored']} of {a['n']:,} statements in that time; its rate is the stored count "
            "over the window, and its latencies count the statements still queued at the end "
            "with their wait so far (lower bounds, hence ≥). At that rate the full run would "
            f"take about {a['n'] / a['statements_per_s'] / 60:.0f} minutes.",
            "",
        ]
    dep = res.get("deployment")
    if dep:
        first, second, check = dep["site-first"], dep["site-second"], dep["site-check"]
        lines += [
            "Deployment (`site.yml`, 3 hosts, `bench/inventory/hosts.yml`; fresh containers "
            "after `lab/prepare.yml`, which is the operator's existing Pod and is not timed):",
            "",
            "| run | wall time | changed |",
            "|---|---:|---:|",
            f"| first run, bare hosts | {first['seconds']} s | {first['changed']} |",
            f"| second run | {second['seconds']} s | {second['changed']} |",
            f"| `--check --diff` | {check['seconds']} s | {check['changed']} |",
            "",
        ]
    lines += ["Targets:", ""]
    if "a" in runs and "b" in runs:
        ratio = runs["b"]["statements_per_s"] / runs["a"]["statements_per_s"]
        lines.append(f"- (b) ≥ 20x (a): {ratio:.0f}x — {verdict(ratio >= 20)}")
    if "b" in runs and "c" in runs:
        share = runs["b"]["statements_per_s"] / runs["c"]["statements_per_s"]
        lines.append(f"- (b) ≥ 50 % of (c): {share:.0%} — {verdict(share >= 0.5)}")
    if "bdrain" in runs and "c" in runs:
        share = runs["bdrain"]["statements_per_s"] / runs["c"]["statements_per_s"]
        lines.append(
            f"- not a target, for reading the one above: (b)'s workers alone reach {share:.0%} "
            "of (c)"
        )
    if dep:
        ok = second["seconds"] <= 60 and second["changed"] == 0
        lines.append(
            f"- second run ≤ 60 s with changed=0: {second['seconds']} s, changed="
            f"{second['changed']} — {verdict(ok)}"
        )
    lines += ["", END]
    return "\n".join(lines)


def cpu_cell(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return "—"
    return f"{cpu['total']:.2f} ms ({cpu['main']:.2f} + {cpu['pool']:.2f})"


def results_file(res: dict[str, Any]) -> str:
    """The name bench/pipeline.py gave this run's results."""
    return f"bench-{dt.datetime.fromisoformat(res['date']):%Y%m%dT%H%M%SZ}.json"


def spool_section(res: dict[str, Any]) -> str:
    """The spool's drain against Ralph's direct ceiling, and the worker's CPU per statement
    in every run that measured it. Phases may repeat (e.g. spool,cspool,spool,cspool): every
    run gets its row, and the goal is judged on the medians."""
    of = {c: [r for r in res["runs"] if r["config"] == c] for c in SPOOL_CONFIGS | {"b"}}
    drains, ceilings = of["spool"], of["cspool"]
    lines = [
        SPOOL_START,
        "## The spool and the worker's CPU (`make bench`, phases spool and cspool)",
        "",
        f"Measured {res['date'][:10]} with `{res['command']}`, same machine and kind of "
        f"hosts as above (raw results: `bench/results/{results_file(res)}`). Phase spool: "
        "Ralph stopped, statements queued in one burst with Pod's "
        "`.delay()`; the worker takes them from Redis into its spool on the encoding host. "
        "Then Ralph comes back with an empty store and the spool drains. Phase spoolbefore: "
        "the same with the worker of an earlier commit. Phase cspool: (c) "
        "with the same number of statements, so Ralph's store grows to the same size (its "
        "FS backend re-reads the store on every POST). Both rates are taken between the "
        "first and the last `stored` stamp. Worker CPU: utime + stime of the processes of "
        "the `celeryd-xapi@` units (`/proc`), main process + pool processes, over the run, "
        "divided by the statements. Runs in the order they ran.",
        "",
    ]
    if drains and ceilings:
        ceiling = statistics.median(r["statements_per_s"] for r in ceilings)
        lines += [
            "| run | statements | seconds | statements/s | share of (c)'s median |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in res["runs"]:
            if r["config"] in SPOOL_CONFIGS:
                lines.append(
                    f"| {r['label']} | {r['n']:,} | {r['seconds']} "
                    f"| {r['statements_per_s']:g} | {r['statements_per_s'] / ceiling:.0%} |"
                )
        share = statistics.median(r["statements_per_s"] for r in drains) / ceiling
        lines += [
            "",
            f"- the spool's drain ≥ {DRAIN_SHARE:.0%} of (c), medians of {len(drains)} and "
            f"{len(ceilings)} runs: {share:.0%} — {verdict(share >= DRAIN_SHARE)}",
        ]
        if of["spoolbefore"]:
            earlier = statistics.median(r["statements_per_s"] for r in of["spoolbefore"])
            lines.append(
                f"- {of['spoolbefore'][0]['label']}, median of {len(of['spoolbefore'])}: "
                f"{earlier / ceiling:.0%} of (c)"
            )
        lines += [
            f"- {drains[-1]['n']:,} statements from Redis into the spool in "
            + ", ".join(f"{r['spooled_seconds']} s" for r in drains)
            + " (producer included)",
            "",
        ]
    cpu_rows = [r for r in res["runs"] if r.get("worker_cpu_ms")]
    if cpu_rows:
        lines += [
            "| run | worker CPU per statement (main + pool) |",
            "|---|---:|",
        ]
        for r in cpu_rows:
            lines.append(f"| {r['label']} | {cpu_cell(r['worker_cpu_ms'])} |")
            if r.get("worker_cpu_spooling_ms"):
                lines.append(
                    f"| {r['label']}: taking into the spool, LRS away "
                    f"| {cpu_cell(r['worker_cpu_spooling_ms'])} |"
                )
        lines.append("")
        for name, runs in (("live (b)", of["b"]), ("draining the spool", drains)):
            totals = [r["worker_cpu_ms"]["total"] for r in runs if r.get("worker_cpu_ms")]
            if totals:
                worst = max(totals)
                lines.append(
                    f"- worker CPU per delivered statement, {name} ≤ {CPU_MS} ms: "
                    f"{worst:.2f} ms at most — {verdict(worst <= CPU_MS)}"
                )
    lines += ["", SPOOL_END]
    return "\n".join(lines)


def dead_section(res: dict[str, Any]) -> str:
    """The dead letters in their two places (phase dead, bench/dead_letters.py): the last
    run of the phase."""
    r = [run for run in res["runs"] if run["config"] == "dead"][-1]
    n, size = r["n"], r["size"]

    def each(seconds: float) -> str:
        return f"{seconds:.1f} s ({seconds * 1000 / n:.2f} ms each)"

    def pair(key: str, cell: Callable[[float], str] = each) -> str:
        return f"| {cell(r[key]['disk'])} | {cell(r[key]['broker'])} |"

    memory = size["broker_memory_bytes"]
    total = r.get("phase_seconds")
    lines = [
        DEAD_START,
        "## The dead letters: the node's disk against the broker's list (`make bench`, phase dead)",
        "",
        f"Measured {res['date'][:10]} with `{res['command']}`, same machine and kind of hosts "
        f"as above (raw results: `bench/results/{results_file(res)}`). On the encoding host, "
        "as the worker's user with its settings (`bench/dead_letters.py`; the workers stopped "
        f"meanwhile, started again after): {n:,} dead letters of refused statements "
        f"({r['entry_bytes']:,} bytes of JSON each) written one at a time, as a batch's "
        "settling writes them, to a node's spool file on the host's disk (a transaction "
        "each, committed to disk) and to the broker's list on the frontal (one script call "
        "each, over the network; the broker's AOF is fsync-ed every second); then the "
        "operator's commands, timed as run from the shell, each with `--where disk --node "
        "NODE` or `--where broker`: `list`, `replay` (the statements published onto the "
        "queue, one at a time), the letters written again, `purge --yes`.",
        "",
        "| | the node's disk (its spool file) | the broker's list (legacy) |",
        "|---|---:|---:|",
        f"| write {n:,} dead letters, one at a time " + pair("write_s"),
        "| the same, again (before the purge) " + pair("write_again_s"),
        f"| size | {size['disk_file_bytes'] / MIB:.1f} MiB (file and WAL); counted against "
        f"`XAPI_WORKER_DEAD_LETTER_MAX_MB`: {size['disk_counted_bytes'] / MIB:.1f} MiB "
        "| "
        + (f"{memory / MIB:.1f} MiB of the broker's memory" if memory else "—")
        + f" ({size['broker_element_bytes'] / MIB:.1f} MiB of elements) |",
        "| `dead-letters list` " + pair("list_s", lambda v: f"{v:.1f} s"),
        "| `dead-letters replay` " + pair("replay_s", each),
        "| `dead-letters purge --yes` " + pair("purge_s", lambda v: f"{v:.1f} s"),
        f"| size after the purge | {size['disk_file_bytes_purged'] / MIB:.1f} MiB | 0 |",
        "",
        f"- Each command's own start (`dead-letters list` with nothing to list): "
        f"{r['command_start_s']:.1f} s.",
    ]
    if total:
        lines.append(f"- The phase took {total:.0f} s (`--dead-n {n}`).")
    lines += ["", DEAD_END]
    return "\n".join(lines)


def replace(text: str, start: str, end: str, new: str) -> str:
    """The section between its markers, or before the loopback section the first time."""
    if start in text:
        head, rest = text.split(start, 1)
        return head + new + rest.split(end, 1)[1]
    head, rest = text.split("## Loopback worker", 1)
    return f"{head}{new}\n\n## Loopback worker{rest}"


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "bench/results/latest.json"
    res = json.loads(source.read_text())
    configs = {r["config"] for r in res["runs"]}
    text = DOC.read_text()
    # A partial run (e.g. --phases deploy,b,spool,cspool) leaves the pipeline's table of the
    # last full run in place: it is rewritten only with its reference, (c).
    if "c" in configs:
        pipeline = [r for r in res["runs"] if r["config"] not in APART]
        chart(pipeline)
        text = replace(text, START, END, section({**res, "runs": pipeline}))
    if configs & SPOOL_CONFIGS:
        text = replace(text, SPOOL_START, SPOOL_END, spool_section(res))
    if "dead" in configs:
        text = replace(text, DEAD_START, DEAD_END, dead_section(res))
    DOC.write_text(text)
    print(
        f"wrote {DOC.relative_to(REPO)}"
        + (f" and {CHART.relative_to(REPO)}" if "c" in configs else "")
    )


if __name__ == "__main__":
    main()
