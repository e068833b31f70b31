"""The run's ``metrics.jsonl``: one strict-JSON row per log step. Read tolerantly (a line
cut short by a killed run is dropped, not fatal), cut back to the step a resumed run
starts from (so no step is logged twice), and plotted without ever failing a run."""
from __future__ import annotations

import json
import logging
import secrets
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


WANDB_ID = "wandb-id.txt"  # in --out: the wandb run a --resume continues


def start_wandb(args, out):
    """A wandb run for --report-to wandb, its files in ``out/wandb``: the id recorded in
    ``out`` when it started is reused by a resumed run (so its rows continue the same wandb
    run), a new one otherwise. ``$WANDB_MODE=offline`` writes it for a later ``wandb sync``."""
    import wandb
    id_file = Path(out) / WANDB_ID
    run_id = id_file.read_text().strip() if args.resume is not None and id_file.is_file() \
        else secrets.token_hex(4)  # wandb's id alphabet: lower-case letters and digits
    atomic_write_text(id_file, run_id + "\n")
    (Path(out) / "wandb").mkdir(exist_ok=True)
    return wandb.init(project=args.wandb_project_name, notes=args.wandb_notes or None,
                      dir=str(out), id=run_id, resume="allow", name=Path(out).name,
                      config={k: v for k, v in vars(args).items() if k != "data_ids"})


class MetricsSink:
    """Where the loop's rows go: ``metrics.jsonl`` (cut back to ``start_step`` first, so a
    resumed run logs no step twice), with ``tensorboard`` event files in
    ``out/tensorboard`` (each number under its name, at its step), and a ``wandb`` run's
    log (``start_wandb``)."""

    def __init__(self, out, start_step: int, tensorboard: bool = False, wandb=None):
        path = Path(out) / "metrics.jsonl"
        cut_back(path, start_step)
        self.file = open(path, "a", encoding="utf-8")
        self.writer, self.wandb = None, wandb
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=start_step + 1)

    def write(self, row: dict) -> None:
        self.file.write(row_line(row))
        self.file.flush()
        numbers = {key if "/" in key else f"train/{key}": value for key, value in row.items()
                   if key != "step" and isinstance(value, (int, float)) and value == value}
        if self.writer is not None:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["step"])

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


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
    rows = [r for r in rows if "loss" in r]  # not the evaluation rows (eval/...)
    if not rows:
        return
    skip = ("step", "lr", "samples_per_s", "samples_per_s_per_gpu", "data_time",
            "skipped_samples", "skipped_steps", "grad_norm")
    keys = [k for k in rows[0] if k not in skip]
    nan = float("nan")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        axes[0].plot([r["step"] for r in rows], [r.get(k) if r.get(k) is not None else nan
                                                   for r in rows], label=k)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].legend()
    axes[0].set_title("losses")
    axes[1].plot([r["step"] for r in rows], [r.get("samples_per_s", nan) for r in rows])
    axes[1].set_xlabel("step")
    axes[1].set_title("samples/s")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
