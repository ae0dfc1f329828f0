"""Run loggers: Weights & Biases (offline unless asked otherwise) or nothing. Each has start/log_results/finish;
mbs.pipeline.run calls finish on every path, so a run is closed also when the job fails."""
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
        """The per-language table (ordered by training share), a bar chart of degradation by language in that order
        (W&B's own bar plot, and the report's matplotlib figure as an image because W&B may re-sort bars), summary
        metrics, achieved sparsity and timings. The resolved config went in at start."""
        import wandb

        from mbs.record.report import aggregate, frame, plot_degradation
        from mbs.sweep import Job

        rows = sorted(results["languages"], key=lambda r: (-r["share"], r["language"]))
        columns = ["language", "training_share", "dense_ppl", "compressed_ppl", "ratio", "log_ratio", "tokens"]
        table = wandb.Table(columns=columns, data=[[r["language"], r["share"], r["dense_ppl"], r["compressed_ppl"],
                                                    r["ratio"], r["log_ratio"], r["tokens"]] for r in rows])
        logged: dict[str, Any] = {
            "languages": table,
            "degradation_by_language": wandb.plot.bar(table, "language", "ratio",
                                                      title="Perplexity ratio by language (by training share)")}
        try:
            import matplotlib.pyplot as plt

            name = self.name or results["compression"]["method"]
            fig = plot_degradation(aggregate(frame([Job([], "done", results=results)])).assign(condition=name))
            logged["degradation_plot"] = wandb.Image(fig)
            plt.close(fig)
        except Exception as err:  # noqa: BLE001 - a missing image must not lose the run's numbers
            log.warning("W&B degradation image not logged: %s", err)
        zeroshot = (results.get("zeroshot") or {}).get("results", [])
        if zeroshot:  # lm-eval accuracy per task and metric, dense vs compressed (mbs/evaluate/zeroshot.py)
            logged["zeroshot"] = wandb.Table(columns=list(zeroshot[0]), data=[list(r.values()) for r in zeroshot])
        self._run.log(logged)
        s = results["summary"]
        summary: dict[str, Any] = {f"summary/{k}": v for k, v in s.items() if not isinstance(v, list)}
        summary["summary/low_resource_languages"] = ",".join(s.get("low_resource_languages", []))
        summary["experiment_id"] = results.get("experiment_id")
        summary["sparsity/overall"] = results["compression"]["sparsity"]
        summary.update({f"timing/{k}": v for k, v in results["timings"].items()})
        summary.update({f"ppl_ratio/{r['language']}": r["ratio"] for r in rows})
        summary.update({f"zeroshot/{r['task']}/{r['metric']}/{k}": r[k] for r in zeroshot
                        for k in ("dense", "compressed", "difference")})
        for key, value in summary.items():
            self._run.summary[key] = value

    def finish(self, failed: bool = False) -> None:
        if self._run is not None:
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None
