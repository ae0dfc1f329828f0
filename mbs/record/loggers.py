"""Run loggers: Weights & Biases (offline unless asked otherwise) or nothing. Each has start/log_results/finish;
mbs.pipeline.run calls finish on every path, so a run is closed also when the job fails."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from mbs.analyze.similarity_plots import model_label, wandb_media
from mbs.record.frame import result_rows
from mbs.record.results import RunResult, by_training_share

log = logging.getLogger(__name__)


@dataclass
class NoLogger:
    def start(self, config: dict[str, Any], directory: str, name: str | None = None) -> "NoLogger":
        return self

    def log_results(self, results: RunResult) -> None:
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
    name: str | None = None  # None: the run's own name, e.g. "gemma3-270m · wanda 0.5 · mbs · seed 0"

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode={self.mode!r} is not one of offline, online, disabled")
        self._run = None

    def start(self, config: dict[str, Any], directory: str, name: str | None = None) -> "WandbLogger":
        """``config`` holds the resolved config plus ``choices`` (the option of each group) and ``schemas``, so runs
        can be grouped by ``choices.compressor`` or ``choices.sampler``; the same choices also go in as tags."""
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        choice_tags = [f"{group}:{option}" for group, option in config.get("choices", {}).items()
                       if group in ("model", "sampler", "compressor", "data")]
        tags = list(dict.fromkeys([*self.tags, *choice_tags]))
        self._run = wandb.init(project=self.project, entity=self.entity, mode=self.mode, group=self.group, tags=tags,
                               name=self.name or name, config=config, dir=directory, reinit="create_new")
        return self

    def log_results(self, results: RunResult) -> None:
        """The per-language table (ordered by training share, shares in percent) and a bar chart of it, the report's
        degradation figure titled with the run, per-language summary values (``dense_ppl/<lang>``,
        ``compressed_ppl/<lang>``, ``ratio/<lang>``, ``dense_bpb/<lang>``, ``compressed_bpb/<lang>``,
        ``calibration_segments/<lang>``), the summary metrics, achieved sparsity, timings, and results.json as an
        artifact. The resolved config went in at start."""
        import wandb


        s = results.summary
        rows = by_training_share(results.languages)
        segments = results.calibration["segments"]
        columns = ["language", "training_share_pct", "dense_ppl", "compressed_ppl", "ratio", "log_ratio", "dense_bpb",
                   "compressed_bpb", "tokens", "bytes", "low_resource", "calibration_segments"]
        table = wandb.Table(columns=columns, data=[
            [r["language"], None if r.get("training_share") is None else 100 * r["training_share"], r["dense_ppl"],
             r["compressed_ppl"], r["ratio"], r["log_ratio"], r.get("dense_bpb"), r.get("compressed_bpb"), r["tokens"],
             r.get("bytes"), r["low_resource"], r["calibration_segments"]]
            for r in rows])
        calibration = wandb.Table(columns=["language", "segments"], data=[[k, v] for k, v in segments.items()])
        logged: dict[str, Any] = {
            "languages": table, "calibration": calibration,
            "degradation_by_language": wandb.plot.bar(table, "language", "ratio",
                                                      title="Perplexity ratio by language (by training share)")}
        image = self._degradation_image(results)
        if image is not None:
            logged["degradation_plot"] = image
        if results.similarity:
            try:

                logged.update(wandb_media(results.similarity, model_label(results)))
            except Exception as err:  # noqa: BLE001 - as above
                log.warning("W&B language similarity not logged: %s", err)
        risk = results.risk or {}
        if risk:  # predicted damage before compressing, the measured log ratio beside it (mbs/analyze/damage.py)
            measured = risk.get("measured_log_ratio", {})
            logged["risk"] = wandb.Table(columns=["language", "predicted_damage", "measured_log_ratio"],
                                         data=[[k, v, measured.get(k)] for k, v in risk["predicted"].items()])
        zeroshot = (results.zeroshot or {}).get("results", [])
        if zeroshot:  # lm-eval accuracy per task and metric, dense vs compressed (mbs/evaluate/zeroshot.py)
            logged["zeroshot"] = wandb.Table(columns=list(zeroshot[0]), data=[list(r.values()) for r in zeroshot])
        self._run.log(logged)
        summary: dict[str, Any] = {f"summary/{k}": v for k, v in s.items() if not isinstance(v, list)}
        summary["summary/low_resource_languages"] = ",".join(s.get("low_resource_languages", []))
        summary["experiment_id"] = results.experiment_id
        summary["sparsity/overall"] = results.compression["sparsity"]
        summary.update({f"timing/{k}": v for k, v in results.timings.items()})
        for r in rows:
            for metric in ("dense_ppl", "compressed_ppl", "ratio", "log_ratio", "dense_bpb", "compressed_bpb"):
                if r.get(metric) is not None:
                    summary[f"{metric}/{r['language']}"] = r[metric]
        summary.update({f"calibration_segments/{k}": v for k, v in segments.items()})
        summary.update({f"predicted_damage/{k}": v for k, v in risk.get("predicted", {}).items()})
        if risk.get("spearman") is not None:
            summary["risk/spearman"] = risk["spearman"]
        summary["calibration_segments/total"] = results.calibration["total"]
        summary.update({f"zeroshot/{r['task']}/{r['metric']}/{k}": r[k] for r in zeroshot
                        for k in ("dense", "compressed", "difference")})
        for key, value in summary.items():
            self._run.summary[key] = value
        self._log_artifact(results)
        if results.export:
            self._log_model(results)

    def _degradation_image(self, results: RunResult) -> Any:
        """The report's figure for this one run (W&B's own bar plot may re-sort bars), captioned with the run name."""
        import wandb

        try:
            import pandas as pd

            from mbs.record.report import aggregate, plot_degradation  # pandas and matplotlib: only when logging

            name = self._run.name or results.compression["method"]
            agg = aggregate(pd.DataFrame(result_rows(results, name, results.experiment_id or name)))
            fig = plot_degradation(agg, title=name)
            image = wandb.Image(fig, caption=name)
            import matplotlib.pyplot as plt

            plt.close(fig)
            return image
        except Exception as err:  # noqa: BLE001 - a missing image must not lose the run's numbers
            log.warning("W&B degradation image not logged: %s", err)
            return None

    def _log_artifact(self, results: RunResult) -> None:
        """results.json (from the dict, so it does not depend on when the file is written) as a versioned artifact
        named after the experiment id: re-runs of the same experiment become versions of one artifact."""
        import json

        import wandb

        artifact = wandb.Artifact(f"results-{results.experiment_id or self._run.id}", type="results",
                                  metadata={"name": self._run.name, **results.run.get("choices", {})})
        with artifact.new_file("results.json", mode="w", encoding="utf-8") as f:
            f.write(json.dumps(results.to_json(), indent=2, default=str))
        self._run.log_artifact(artifact)

    def _log_model(self, results: RunResult) -> None:
        """The exported checkpoint (save_model=true: weights, config, tokenizer, model card) as an artifact of type
        ``model``, named after the experiment id. The files are referenced where they are (policy immutable: the run
        does not change them after this), not copied into a staging area; a failure here loses no result."""
        import wandb

        try:
            artifact = wandb.Artifact(f"model-{results.experiment_id or self._run.id}", type="model",
                                      metadata={"name": self._run.name, "format": results.export.get("format"),
                                                "bytes_on_disk": results.export.get("bytes_on_disk"),
                                                **results.run.get("choices", {})})
            artifact.add_dir(results.export["directory"], policy="immutable")
            self._run.log_artifact(artifact)
        except Exception as err:  # noqa: BLE001 - the checkpoint is on disk; W&B holding a copy is a convenience
            log.warning("W&B model artifact not logged: %s", err)

    def finish(self, failed: bool = False) -> None:
        if self._run is not None:
            where = self._run.dir and os.path.dirname(self._run.dir)
            offline = self._run.settings.mode == "offline" if hasattr(self._run, "settings") else self.mode == "offline"
            url = None if offline else getattr(self._run, "url", None)
            self._run.finish(exit_code=1 if failed else 0)
            self._run = None
            if offline and where:
                log.info("W&B offline run: %s (upload it with: wandb sync %s)", where, where)
            elif url:
                log.info("W&B run: %s", url)
