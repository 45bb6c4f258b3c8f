"""Issue 16's and issue 17's targets, evaluated on one run's document.

Issue 7's targets are ``report.evaluate_targets``; these are the later ones: the
shared scheduler against the direct connection (issue 16), and dispynb against
ProcessPoolExecutor, Ray, Dask, raw TCP and dispy (issue 17). Every verdict comes
from the run's own numbers; a target whose numbers the run did not measure is
reported as such, never given a verdict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crosshost_report import RAW_TCP_BOUND, crosshost_target

__all__ = ["NOT_MEASURED", "evaluate_issue_targets"]

SUBJECT = "dispynb"
SCHEDULER = "dispynb-scheduler"
NOT_MEASURED = "not measured in this run"


def _result(document: Mapping[str, Any], key: str, name: str) -> Any:
    return document["metrics"].get(key, {}).get("results", {}).get(name)


def _median(document: Mapping[str, Any], key: str, name: str) -> float | None:
    entry = _result(document, key, name)
    return None if entry is None else float(entry["median"])


def _entry(
    issue: int,
    text: str,
    unit: str,
    value: float | None,
    limit: float | None,
    reference: str,
    higher: bool,
) -> dict[str, Any]:
    """One row: PASS/MISS when both numbers exist, else not measured."""
    if value is None or limit is None:
        return {
            "issue": issue,
            "target": text,
            "unit": unit,
            "value": None,
            "limit": None,
            "reference": reference,
            "ratio": None,
            "status": NOT_MEASURED,
        }
    ok = value >= limit if higher else value <= limit
    return {
        "issue": issue,
        "target": text,
        "unit": unit,
        "value": value,
        "limit": limit,
        "reference": reference,
        "ratio": value / limit if limit else None,
        "status": "PASS" if ok else "MISS",
    }


def evaluate_issue_targets(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Issue 16's and 17's targets as rows like ``report.evaluate_targets``'
    (``target``, ``value``, ``limit``, ``unit``, ``reference``, ``ratio`` =
    value / limit, ``status``) plus ``issue``; ``status`` is ``PASS``, ``MISS`` or
    `NOT_MEASURED`."""
    rows = []
    # Issue 16: the shared scheduler's relay against the direct connection.
    direct = _median(document, "throughput", SUBJECT)
    via = _median(document, "throughput", SCHEDULER)
    rows.append(
        _entry(
            16,
            "W1 through the scheduler >= 0.7x direct",
            "jobs/s",
            via,
            0.7 * direct if direct is not None else None,
            f"0.7 x dispynb direct ({direct:,.0f})" if direct else "dispynb direct",
            higher=True,
        )
    )
    direct = _median(document, "latency_median", SUBJECT)
    via = _median(document, "latency_median", SCHEDULER)
    hop = via - direct if via is not None and direct is not None else None
    rows.append(
        _entry(
            16,
            "W2 median through the scheduler minus direct <= +0.3 ms",
            "ms",
            hop,
            0.3,
            f"scheduler {via:.3f} - direct {direct:.3f}"
            if hop is not None
            else "fixed",
            higher=False,
        )
    )
    # Issue 17: against ProcessPoolExecutor, Ray, Dask, raw TCP and dispy.
    ppe = _median(document, "throughput", "ppe")
    rows.append(
        _entry(
            17,
            "W1 >= 1.0x ProcessPoolExecutor",
            "jobs/s",
            _median(document, "throughput", SUBJECT),
            ppe,
            f"ppe ({ppe:,.0f})" if ppe else "ppe",
            higher=True,
        )
    )
    ppe = _median(document, "latency_median", "ppe")
    rows.append(
        _entry(
            17,
            "W2 median <= 2x ProcessPoolExecutor's",
            "ms",
            _median(document, "latency_median", SUBJECT),
            2 * ppe if ppe is not None else None,
            f"2 x ppe ({ppe:.3f})" if ppe is not None else "ppe",
            higher=False,
        )
    )
    rows.append(_cold_row(document))
    rows.append(_crosshost_row(document))
    rows.append(_shared_object_row(document))
    dispy = _median(document, "mem_nodes_pss_w1", "dispy")
    rows.append(
        _entry(
            17,
            "node PSS after W1 <= dispy's",
            "MiB",
            _median(document, "mem_nodes_pss_w1", SUBJECT),
            dispy,
            f"dispy ({dispy:.1f})" if dispy is not None else "dispy",
            higher=False,
        )
    )
    return rows


def _cold_row(document: Mapping[str, Any]) -> dict[str, Any]:
    """W4 cold: dispynb's slowest repetition against twice Ray's median, so the
    verdict holds for every repetition."""
    ours = _result(document, "bandwidth_cold", SUBJECT)
    ray = _median(document, "bandwidth_cold", "ray")
    if ours is None or ray is None:
        return _entry(
            17,
            "W4 cold >= 2x Ray in every repetition",
            "MB/s",
            None,
            None,
            "2 x ray",
            True,
        )
    per_run = ", ".join(f"{v / ray:.2f}" for v in ours["runs"])
    return _entry(
        17,
        "W4 cold >= 2x Ray in every repetition",
        "MB/s",
        min(ours["runs"]),
        2 * ray,
        f"2 x ray ({ray:,.0f}); slowest of dispynb's repetitions (each / ray:"
        f" {per_run})",
        higher=True,
    )


def _crosshost_row(document: Mapping[str, Any]) -> dict[str, Any]:
    """Cross-host W4 against raw TCP on the same veths, of the medians."""
    text = f"cross-host W4 >= {RAW_TCP_BOUND}x raw TCP"
    crosshost = document.get("crosshost")
    target = crosshost_target(crosshost) if crosshost else None
    if target is None:
        return _entry(17, text, "MB/s", None, None, "raw TCP", True)
    per_run = ", ".join(f"{r:.2f}" for r in target["ratios"])
    return _entry(
        17,
        text,
        "MB/s",
        target["value"],
        RAW_TCP_BOUND * target["raw"],
        f"{RAW_TCP_BOUND} x raw TCP ({target['raw']:,.0f}); W4 / raw"
        f" {target['ratio']:.2f} of the medians, per repetition {per_run}",
        higher=True,
    )


def _shared_object_row(document: Mapping[str, Any]) -> dict[str, Any]:
    """W7 (one 100 MB object, 200 jobs): dispynb's ``put`` no slower than the
    faster of ``ray.put`` and Dask's ``scatter(broadcast=True)``."""
    text = "W7 shared object <= the faster of Ray (ray.put) and Dask (scatter)"
    peers = {
        name: value
        for name in ("ray", "dask")
        if (value := _median(document, "shared_object", name)) is not None
    }
    if not peers:
        return _entry(17, text, "s", None, None, "ray, dask", False)
    name = min(peers, key=peers.__getitem__)
    missing = [n for n in ("ray", "dask") if n not in peers]
    note = f"; {', '.join(missing)} not measured" if missing else ""
    return _entry(
        17,
        text,
        "s",
        _median(document, "shared_object", SUBJECT),
        peers[name],
        f"{name} ({peers[name]:.2f}){note}",
        higher=False,
    )
