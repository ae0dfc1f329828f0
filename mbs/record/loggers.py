"""Run loggers: Weights & Biases (offline unless asked otherwise) or nothing. A logger is a context manager so every
run is finished, also when the job fails."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class NoLogger:
    def start(self, config: dict[str, Any], directory: str) -> "NoLogger":
        return self

    def log_results(self, results: dict[str, Any]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


@dataclass
class WandbLogger:
    project: str = "mbs"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    name: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={self.mode!r} is not one of offline, online, disabled")
        self._run = None

    def start(self, config: dict[str, Any], directory: str) -> "WandbLogger":
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, group=self.group,
                               tags=list(self.tags), name=self.name, config=config, dir=directory, reinit="create_new")
        return self

    def log_results(self, results: dict[str, Any]) -> None:
        import wandb

        rows = results["languages"]
        columns = list(rows[0]) if rows else []
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])
        self._run.log({"languages": table})
        summary = {f"summary/{k}": v for k, v in results["summary"].items()}
        summary["sparsity/overall"] = results["compression"]["sparsity"]
        summary.update({f"timing/{k}": v for k, v in results["timings"].items()})
        summary.update({f"ppl_ratio/{r['language']}": r["ratio"] for r in rows})
        for key, value in summary.items():
            self._run.summary[key] = value

    def finish(self, failed: bool = False) -> None:
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None
