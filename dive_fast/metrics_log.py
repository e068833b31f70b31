"""The run's ``metrics.jsonl``: one strict-JSON row per log step. Read tolerantly (a line
cut short by a killed run is dropped, not fatal), cut back to the step a resumed run
starts from (so no step is logged twice), and plotted without ever failing a run."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .fileio import atomic_write_text, finite_json

log = logging.getLogger(__name__)


def read_rows(path) -> list[dict]:
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def row_line(row: dict) -> str:
    return json.dumps(finite_json(row), allow_nan=False) + "\n"


def cut_back(path, step: int) -> None:
    """Keeps the readable rows up to ``step`` (the checkpoint a run resumes from)."""
    rows = [r for r in read_rows(path) if r["step"] <= step]
    atomic_write_text(path, "".join(row_line(r) for r in rows))


def plot_curves(metrics_path, out) -> None:
    """Loss parts and samples/s against step; a failure is logged, never raised."""
    try:
        _plot(read_rows(metrics_path), out)
    except Exception as exc:  # noqa: BLE001 - a plot must not fail a finished run
        log.warning("could not plot %s: %s", metrics_path, exc)


def _plot(rows, out) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not rows:
        return
    skip = ("step", "lr", "samples_per_s", "skipped_samples", "skipped_steps", "grad_norm")
    keys = [k for k in rows[0] if k not in skip]
    nan = float("nan")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        axes[0].plot([r["step"] for r in rows], [r.get(k) if r.get(k) is not None else nan
                                                   for r in rows], label=k)
    axes[0].set_yscale("log"); axes[0].set_xlabel("step"); axes[0].legend(); axes[0].set_title("losses")
    axes[1].plot([r["step"] for r in rows], [r.get("samples_per_s", nan) for r in rows])
    axes[1].set_xlabel("step"); axes[1].set_title("samples/s")
    fig.tight_layout(); fig.savefig(out, dpi=110); plt.close(fig)
