"""Metrics to a local JSONL file and, optionally, to Weights & Biases.

W&B is imported only when a logger is created with ``mode != "disabled"``; ``offline`` (the default)
needs no account and writes under ``<run_dir>/wandb`` for a later ``wandb sync``. A missing wandb
package degrades to JSONL-only with a warning rather than stopping a run.

Under a process group (torchrun) only rank 0 logs: on the other ranks a logger is a silent no-op (no
directory, no file, no W&B run), so code may create and use one on every rank.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, mode: str = "offline", project: str = "ouroboros",
                 config: dict[str, Any] | None = None, name: str | None = None, group: str | None = None,
                 job_type: str = "meta-train", resume_id: str | None = None):
        from meta import distributed as D

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.wandb_run = None
        self.enabled = D.is_main()  # rank 0 alone writes under torchrun
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if mode != "disabled":
            try:
                import wandb  # lazy: optional at import time
            except ImportError:
                warnings.warn("wandb is not installed; logging to metrics.jsonl only", stacklevel=2)
            else:
                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb_run = wandb.init(
                    project=project, mode=mode, dir=str(self.run_dir), config=config, name=name,
                    group=group, job_type=job_type, id=resume_id, resume="allow" if resume_id else None,
                    reinit="finish_previous",
                )

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """A missing value (None, e.g. ``meta_loss`` of a step with no usable member) is ``null`` in the
        JSONL record and left out of the W&B row (a gap in the chart, not a zero)."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop JSONL records past the checkpoint so the file matches the run's state."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(k + "\n" for k in kept))

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def log_artifact(self, path: str | Path, name: str, kind: str = "model", aliases: list[str] | None = None):
        if self.wandb_run is None:
            return
        import wandb

        art = wandb.Artifact(name, type=kind)
        p = Path(path)
        art.add_dir(str(p)) if p.is_dir() else art.add_file(str(p))
        self.wandb_run.log_artifact(art, aliases=aliases or [])

    def log_image(self, key: str, path: str | Path) -> None:
        if self.wandb_run is None:
            return
        import wandb

        self.wandb_run.log({key: wandb.Image(str(path))})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table (e.g. a governor verdict) to W&B; also a JSONL record so it is never W&B-only."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"table": key, "columns": columns, "rows": rows}) + "\n")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows)})

    def alert(self, title: str, text: str) -> None:
        """A W&B alert (email / Slack per the W&B settings), level ERROR; nothing without W&B."""
        if self.wandb_run is None:
            return
        import wandb

        level = getattr(getattr(wandb, "AlertLevel", None), "ERROR", None)
        self.wandb_run.alert(title=title, text=text, **({"level": level} if level is not None else {}))

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
