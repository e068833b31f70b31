"""The report as markdown tables (per method: ID, OOD, zero-shot, their means, RSA; each
set's top-1 / top-5) and the summary metrics ``--keep-best`` reads."""
from __future__ import annotations

from .validate import KINDS

# --keep-best METRIC: a kind's mean of its sets' reported metrics (top-1 unless a --task
# says @macro_f1), or a kind's mean top-1
SUMMARY_METRICS = tuple(f"{kind}_{stat}" for kind in KINDS for stat in ("mean", "top1"))


def summary_value(report: dict, metric: str) -> float | None:
    """``SUMMARY_METRICS`` of a report; None when no set of that kind has a value."""
    kind, _, stat = metric.rpartition("_")
    if stat == "mean":
        return report[metric]
    found = [m["top1"] for name in report[kind]
             if (m := report.get("metrics", {}).get(name)) is not None]
    return sum(found) / len(found) if found else None


def _pct(x):
    return "–" if x is None or x != x else f"{100 * x:.1f}"


def _num(x):
    return "–" if x is None or x != x else f"{x:.3f}"


def format_table(rows: dict[str, dict]) -> str:
    """Markdown: one row per method, columns ID, each OOD, OOD mean, each zero-shot, mean, RSA."""
    first = next(iter(rows.values()))
    cols = ([("id", k) for k in first["id"]] + [("ood", k) for k in first["ood"]] +
            [("ood_mean", None)] + [("zeroshot", k) for k in first["zeroshot"]] +
            [("zeroshot_mean", None)])
    head = ["method"] + [kind.replace("_", " ") if k is None else k for kind, k in cols] + \
        ["RSA img", "RSA txt", "RSA joint"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in rows.items():
        vals = [_pct(r[kind] if k is None else r[kind][k]) for kind, k in cols]
        rs = r.get("rsa")
        vals += [_num(rs[k]) for k in ("image", "text", "joint")] if rs else ["–"] * 3
        lines.append("| " + " | ".join([method] + vals) + " |")
    return "\n".join(lines) + topk_table(rows)


def topk_table(rows: dict[str, dict]) -> str:
    """Markdown after the main table: each set's top-1 / top-5 per method ('' when the rows
    carry no per-set metrics); a set reported by another metric says so in its header."""
    first = next(iter(rows.values()))
    sets = [name for kind in KINDS for name in first[kind]]
    per = {method: r.get("metrics") or {} for method, r in rows.items()}
    if not any(per.values()):
        return ""
    reported = {name: next((m[name]["reported"] for m in per.values() if m.get(name)), "top1")
                for name in sets}
    head = ["method"] + [name if reported[name] == "top1" else
                         f"{name} ({reported[name].replace('_', '-')}: main table)"
                         for name in sets]
    lines = ["", "", "Top-1 / top-5 (%; top-5 '–' for 5 classes or fewer):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, m in per.items():
        vals = [f"{_pct(m[n]['top1'])} / {_pct(m[n]['top5'])}" if m.get(n) else "–"
                for n in sets]
        lines.append("| " + " | ".join([method] + vals) + " |")
    return "\n".join(lines)
