"""Render a benchmark results document as ``docs/benchmarks.md`` (pure Python).

`render_markdown` turns the JSON document written by ``run.py`` into the report: the
command, the machine, the versions, the table of all frameworks and workloads
(median [min-max]), issue 7's and issues 16-17's targets with PASS/MISS, W6's
errors, memory per process, the scale curve, and what did not run. ``plot.py`` calls
it after drawing the PNGs; the unit tests call it on a synthetic document.

Hand-written notes live in ``bench/notes/*.md``, never in ``docs/benchmarks.md``
itself (a regeneration rewrites that file wholly). `NOTES` lists every notes file
and its place: at the end of a generated section (named by its heading), or at the
end of the report. A notes file must be listed there (a test checks it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from crosshost_report import HEADING as CROSSHOST_HEADING
from crosshost_report import crosshost_markdown
from report import MIB, SUBJECT, evaluate_engine_targets, number, table_rows
from targets import evaluate_issue_targets

__all__ = ["NOTES", "engine_lines", "notes_lines", "render_markdown", "splice"]

#: Heading of the section on dispynb running on other engines (issue 14).
ENGINES_HEADING = "## dispynb on Dask and Ray: overhead over the engine alone"

#: Heading of issue 16's and 17's targets.
ISSUE_TARGETS_HEADING = "## Issue 16 and 17 targets"

#: Where the hand-written notes are (one markdown file per place).
NOTES_DIR = Path(__file__).resolve().parent / "notes"

#: Every notes file, in order, and the generated section it closes (``None``: the
#: end of the report). Its text goes after that section's generated lines, before
#: the next ``## `` heading; a section this run did not produce is then rendered as
#: its heading, "not measured in this run", and the notes.
NOTES: tuple[tuple[str, str | None], ...] = (
    ("engines.md", ENGINES_HEADING),
    ("crosshost.md", CROSSHOST_HEADING),
    ("scheduler.md", None),
    ("hardening.md", None),
    ("reading.md", None),
)

ABSENT = "Not measured in this run; the notes below are from earlier runs."


def notes_lines(place: str | None, directory: Path | None = None) -> list[str]:
    """The text of the notes files whose place is ``place`` (a heading, or ``None``
    for the end of the report), in `NOTES` order, each followed by a blank line."""
    lines: list[str] = []
    for name, where in NOTES:
        path = (directory or NOTES_DIR) / name
        if where == place and path.exists():
            lines += [path.read_text(encoding="utf-8").rstrip(), ""]
    return lines


def _section(generated: Sequence[str], heading: str) -> list[str]:
    """A generated section followed by its notes; with nothing generated but notes
    to keep, the heading, `ABSENT` and the notes."""
    notes = notes_lines(heading)
    if generated:
        return [*generated, *notes]
    return [heading, "", ABSENT, "", *notes] if notes else []


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub markdown table; the first row is the header."""
    lines = ["| " + " | ".join(rows[0]) + " |"]
    lines.append("| " + " | ".join("---" for _ in rows[0]) + " |")
    lines += [
        "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:]
    ]
    return lines


def _memory_lines(document: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            "framework",
            "at rest: processes (RSS)",
            "peak: processes (peak RSS)",
            "after W1: processes (PSS)",
        ]
    ]
    for name, memory in document["memory"].items():
        label = document["backends"][name]["label"]
        rows.append(
            [
                label,
                _processes(memory["rest"], "rss"),
                _processes(memory.get("peak"), "hwm"),
                _processes(memory.get("after_w1"), "pss"),
            ]
        )
    return _table(rows)


def _processes(snap: Mapping[str, Any] | None, key: str) -> str:
    """``2 x engine 53.1`` per kind of process, grouped by label (MiB each)."""
    if not snap or not snap["nodes"]:
        return "none"
    counts: Counter[str] = Counter()
    sizes: dict[str, list[float]] = {}
    unread: set[str] = set()  # labels of processes whose size could not be read
    for proc in snap["nodes"]:
        if key not in proc:  # a result from before the benchmark measured it
            return "-"
        counts[proc["label"]] += 1
        if proc[key] is None:
            unread.add(proc["label"])
        else:
            sizes.setdefault(proc["label"], []).append(proc[key] / MIB)
    parts = []
    for label, count in counts.most_common():
        prefix = f"{count} x " if count > 1 else ""
        if label in unread:  # not a mean of the others'
            parts.append(f"{prefix}`{label}` {snap.get(f'{key}_unavailable', '-')}")
            continue
        mean = sum(sizes[label]) / count
        parts.append(f"{prefix}`{label}` {mean:.1f}")
    return "; ".join(parts)


def _scale_lines(scale: Mapping[str, Any]) -> list[str]:
    import statistics

    lines = ["## Scale curve (dispynb)", ""]
    if scale.get("error"):
        lines += [
            f"The scale run failed: `{scale['error'].strip().splitlines()[-1]}`",
            "",
        ]
    if scale.get("nodes"):
        lines += [
            f"Trivial jobs ({scale['nodes'][0]['jobs']:,} per repetition) on N node"
            " processes of one CPU each (`LocalCluster(nodes=N, cpus=1)`); this"
            " machine has 2 CPUs, so from 4 nodes on they share them. Overhead is"
            " CPU time per job: in the client process (all its threads) and in all"
            " node processes together (servers and workers). Median [min-max].",
            "",
        ]
        rows = [
            ["nodes", "jobs/s", "wall us/job", "client CPU us/job", "nodes CPU us/job"]
        ]
        for row in scale["nodes"]:
            rate = row["jobs_per_s"]
            rows.append(
                [
                    str(row["nodes"]),
                    _range(rate, "{:,.0f}"),
                    f"{1e6 / statistics.median(rate):.0f}",
                    _range(row["client_cpu_us_per_job"], "{:.0f}"),
                    _range(row["nodes_cpu_us_per_job"], "{:.0f}"),
                ]
            )
        lines += [*_table(rows), ""]
    if scale.get("queued"):
        lines += [
            "Jobs that sleep, submitted without waiting (1 node, 2 CPUs, so all but"
            " two stay queued); each size runs in a fresh client process. Memory per"
            " pending job = growth of the client's RSS / jobs.",
            "",
        ]
        rows = [
            [
                "queued jobs",
                "client RSS growth",
                "bytes per pending job",
                "submit rate (jobs/s)",
                "close(terminate=True)",
            ]
        ]
        for row in scale["queued"]:
            growth = (row["rss_after"] - row["rss_before"]) / MIB
            rows.append(
                [
                    f"{row['queued']:,}",
                    f"{growth:.1f} MiB",
                    f"{row['bytes_per_job']:,.0f}",
                    f"{row['submit_per_s']:,.0f}",
                    f"{row['close_terminate_s']:.2f} s",
                ]
            )
        lines += [*_table(rows), ""]
    return lines


def _range(values: Sequence[float], fmt: str) -> str:
    import statistics

    median = fmt.format(statistics.median(values))
    if len(values) == 1:
        return median
    return f"{median} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def _target_lines(document: Mapping[str, Any]) -> list[str]:
    rows = [["target", SUBJECT, "limit", "limit from", "dispynb / limit", "status"]]
    for t in document["targets"]:
        ratio = f"{t['ratio']:.2f}" if t["ratio"] is not None else "-"
        rows.append(
            [
                t["target"],
                f"{number(t['value'], t['unit'])} {t['unit']}",
                f"{number(t['limit'], t['unit'])} {t['unit']}",
                t["reference"],
                ratio,
                f"**{t['status']}**",
            ]
        )
    return _table(rows)


def issue_target_lines(document: Mapping[str, Any]) -> list[str]:
    """Issue 16's and 17's targets (`targets.evaluate_issue_targets`) as a section."""
    lines = [
        ISSUE_TARGETS_HEADING,
        "",
        "Issue 16: the shared scheduler (`dispynb-scheduler`) against dispynb's direct"
        " connection; issue 17: dispynb against ProcessPoolExecutor, Ray, Dask, raw"
        " TCP across hosts and dispy. Medians of this run, except where the reference"
        ' says otherwise; "not measured in this run" when the run did not include'
        " the backend or workload the target needs.",
        "",
    ]
    rows = [
        [
            "issue",
            "target",
            "measured",
            "limit",
            "limit from",
            "measured / limit",
            "status",
        ]
    ]
    for t in evaluate_issue_targets(document):
        unit = t["unit"]
        measured = t["value"] is not None
        rows.append(
            [
                str(t["issue"]),
                t["target"],
                f"{number(t['value'], unit)} {unit}" if measured else "-",
                f"{number(t['limit'], unit)} {unit}" if measured else "-",
                t["reference"],
                f"{t['ratio']:.2f}" if t["ratio"] is not None else "-",
                f"**{t['status']}**" if measured else t["status"],
            ]
        )
    return [*lines, *_table(rows), ""]


def engine_lines(document: Mapping[str, Any]) -> list[str]:
    """The section comparing dispynb-on-X with raw X (empty without such rows)."""
    entries = evaluate_engine_targets(document)
    if not entries:
        return []
    config = document["config"]
    lines = [
        ENGINES_HEADING,
        "",
        "The same workloads through dispy's API (`JobCluster(fn, engine=...)`) on the"
        " very cluster configuration the raw row uses, in the same run. Target (issue"
        " 14): at least 0.9x the engine's W1 and W4, at most 1.1x its W2 median."
        f" Median of {config.get('repeat')} repetitions, from the run of"
        f" {document.get('timestamp')}:",
        "",
        "```sh",
        f".venv/bin/python {config.get('command', 'bench/run.py')}",
        "```",
        "",
    ]
    rows = [["engine", "metric", "dispynb on it", "engine alone", "ratio", "target"]]
    for e in entries:
        unit = e["unit"]
        rows.append(
            [
                e["engine"],
                e["label"],
                f"{number(e['value'], unit)} {unit}",
                f"{number(e['raw'], unit)} {unit}",
                f"{e['ratio']:.2f}x",
                f"{e['bound']}: **{e['status']}**",
            ]
        )
    return [*lines, *_table(rows), ""]


def render_markdown(document: Mapping[str, Any], images: Mapping[str, str]) -> str:
    """The report as markdown; ``images`` maps ``"comparison"``/``"scale"`` to the
    PNG file names (relative to the report), for those that were drawn."""
    machine, config = document["machine"], document["config"]
    memory = machine.get("memory_bytes")
    lines = [
        "# Benchmarks: dispynb against dispy, ipyparallel, Dask, Ray, loky and"
        " ProcessPoolExecutor",
        "",
        f"Generated by `bench/plot.py` from `bench/results/` on {document['timestamp']}"
        f" (commit `{machine.get('commit')}`). `bench/README.md` defines the workloads"
        " and describes the method; the targets are listed below.",
        "",
        "Produced by this command (it installs the peers into `bench/.venvs/`, then"
        " measures inside a private network namespace: loopback only):",
        "",
        "```sh",
        f".venv/bin/python {config.get('command', 'bench/run.py')}",
        "```",
        "",
        f"Machine: {machine.get('nproc')} CPUs ({machine.get('cpu_model')}),"
        + (f" {memory / 2**30:.0f} GiB," if memory else "")
        + f" Python {machine.get('python')}, {machine.get('platform')}."
        f" Every framework has {config.get('workers')} workers on these CPUs;"
        f" the run took {config.get('wall_seconds', 0) / 60:.0f} minutes."
        + (
            f" dispynb's bytecode: {config['bytecode']}."
            if "bytecode" in config
            else ""
        ),
        "",
        "## Versions and configuration",
        "",
    ]
    rows = [["framework", "version", "configuration"]]
    for details in document["backends"].values():
        rows.append(
            [
                details["label"],
                str(details.get("version", "-")),
                str(details.get("config", "-")),
            ]
        )
    lines += [*_table(rows), "", "## Results", ""]
    repeat = config.get("repeat")
    lines += [
        f"Median [min-max] of {repeat} repetitions after one untimed warm-up round"
        " (W5: fresh processes each time). Memory is measured once, in the run of"
        " W1-W4. Lower is better for ms, s and MiB.",
        "",
    ]
    lines += [*_table(table_rows(document)), ""]
    if "comparison" in images:
        lines += [f"![comparison of all frameworks]({images['comparison']})", ""]
    lines += ["## Issue 7 targets", ""]
    lines += [
        'Checked on dispynb\'s medians against the same run. "Best peer" is the'
        " best of dispy, ipyparallel, Dask and Ray; loky and ProcessPoolExecutor are"
        " the single-machine floor.",
        "",
    ]
    lines += [*_target_lines(document), ""]
    lines += issue_target_lines(document)
    lines += _section(engine_lines(document), ENGINES_HEADING)
    lines += ["## W6: a `__main__` function with a closure and a helper", ""]
    lines += [
        "`make_closure(5)` returns `closure_job(x) = _double(x) + offset`, where"
        " `_double` is another function of `__main__`; each framework gets it with"
        " no extra declaration (no `depends`, `push`, `use_cloudpickle`).",
        "",
    ]
    rows = [["framework", "runs", "error"]]
    for name, closure in document["closure"].items():
        error = (closure.get("error") or "").strip().replace("\n", " ")
        rows.append(
            [
                document["backends"][name]["label"],
                "yes" if closure["ok"] else "no",
                f"`{error}`" if error else "",
            ]
        )
    lines += [*_table(rows), "", "## Memory per process", ""]
    lines += [
        "RSS in MiB per kind of process started by the client (mean when there are"
        " several). At rest: after start-up and one second of settling, before any"
        " job. Peak: the kernel's high-water mark (VmHWM) of each live process after"
        " W1-W4; processes that had already exited (dispy forks one per job) are not"
        " counted. After W1: the PSS of each live process right after W1 (pages"
        " shared by forked processes split between them, so the PSS add up to the"
        " memory the processes take together).",
        "",
    ]
    lines += [*_memory_lines(document), ""]
    if document.get("scale"):
        lines += _scale_lines(document["scale"])
        if "scale" in images:
            lines += [f"![dispynb scale curve]({images['scale']})", ""]
    lines += _section(
        crosshost_markdown(document, images.get("crosshost")), CROSSHOST_HEADING
    )
    lines += _not_run_lines(document["backends"])
    lines += notes_lines(None)
    return "\n".join(lines)


def _not_run_lines(backends: Mapping[str, Any]) -> list[str]:
    """ "What did not run": each backend's failure, and the workloads it refused
    (``unsupported``: dispynb's own error, not a failure of the run)."""
    lines: list[str] = []
    for details in backends.values():
        if "error" in details:
            last = details["error"].strip().splitlines()[-1]
            lines.append(f"- {details['label']}: `{last}`")
        for workload, reason in details.get("unsupported", {}).items():
            lines.append(
                f"- {details['label']}, {workload}: not supported (`{reason}`)"
            )
    return ["## What did not run", "", *lines, ""] if lines else []


def _splice(
    report: str, section: Sequence[str], heading: str, before: Sequence[str]
) -> str:
    """``report`` with the section under ``heading`` replaced by ``section``, or
    ``section`` inserted before the first line starting with one of ``before``."""
    lines = report.splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
            len(lines),
        )
    else:
        start = end = next(
            (i for i, line in enumerate(lines) if line.startswith(tuple(before))),
            len(lines),
        )
    return "\n".join([*lines[:start], *section, *lines[end:]]) + "\n"


def splice_engine_section(report: str, document: Mapping[str, Any]) -> str:
    """``report`` (a rendered ``docs/benchmarks.md``) with its engines section
    replaced by the one of ``document``, or inserted before the W6 section.

    For a run of only the engine rows (``--backends dask,dispynb-dask``), which
    must not overwrite the full report.
    """
    return _splice(
        report,
        _section(engine_lines(document), ENGINES_HEADING),
        ENGINES_HEADING,
        ["## W6"],
    )


def splice_crosshost_section(
    report: str, document: Mapping[str, Any], image: str | None = None
) -> str:
    """``report`` with its cross-host section replaced by the one of ``document``
    (a ``run.py --cross-host`` run), or inserted after the scale curve."""
    return _splice(
        report,
        _section(crosshost_markdown(document, image), CROSSHOST_HEADING),
        CROSSHOST_HEADING,
        [
            "## Through the shared scheduler",
            "## What did not run",
            "## Reading the numbers",
        ],
    )


def splice(report: str, document: Mapping[str, Any], image: str | None = None) -> str:
    """Splice every section a partial run measured (engines, cross-host) into
    ``report``; the sections it did not measure stay as they are."""
    if evaluate_engine_targets(document):
        report = splice_engine_section(report, document)
    if document.get("crosshost"):
        report = splice_crosshost_section(report, document, image)
    return report


def main(argv: Sequence[str]) -> int:
    """``markdown.py RESULTS.json REPORT.md``: splice the sections of a partial run
    (engines, cross-host) into an existing report."""
    import json

    if len(argv) != 2:
        print("usage: markdown.py RESULTS.json REPORT.md")
        return 2
    document = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    report = Path(argv[1])
    image = "crosshost.png" if (report.parent / "crosshost.png").exists() else None
    report.write_text(
        splice(report.read_text(encoding="utf-8"), document, image),
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
