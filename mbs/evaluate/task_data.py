"""Zero-shot tasks whose data is a hub dataset, checked before the model loads: offline (``HF_HUB_OFFLINE=1``) or
with the hub unreachable, a dataset not in the local datasets cache would otherwise fail after the model has loaded
and the dense model has been evaluated. Hub corpora fail the same way, in one line, in mbs/data/hub.py."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# datasets' packaged builders: they read the task's own data_files (ours: udhr_mc's json), not a hub repository
LOCAL_BUILDERS = ("json", "csv", "parquet", "arrow", "text", "pandas", "imagefolder", "audiofolder")


def task_datasets(manager: Any, tasks: list[str]) -> dict[str, tuple[str, str | None]]:
    """Task name -> (dataset_path, dataset_name) for every task ``tasks`` name, groups expanded."""
    found: dict[str, tuple[str, str | None]] = {}

    def visit(name: str | dict) -> None:
        cfg = name if isinstance(name, dict) else getattr(manager._index.get(name), "cfg", None) or {}
        members = cfg.get("task")
        if isinstance(members, list):
            for member in members:
                visit(member)
        elif cfg.get("dataset_path"):
            found[str(cfg.get("task", name))] = (str(cfg["dataset_path"]), cfg.get("dataset_name"))

    for task in tasks:
        visit(task)
    return found


def needs_hub(path: str) -> bool:
    return path not in LOCAL_BUILDERS and not Path(path).expanduser().exists()


def check_task_data(manager: Any, tasks: list[str]) -> None:
    """A one-line ValueError naming the first task whose hub dataset cannot be had: not cached locally while the
    hub is offline or unreachable. ``datasets.load_dataset_builder`` resolves the dataset without downloading it."""
    import datasets

    from mbs.data.hub import _is_network_error

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
        os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes")
    checked: dict[tuple[str, str | None], None] = {}
    for task, (path, name) in task_datasets(manager, tasks).items():
        if not needs_hub(path) or (path, name) in checked:
            continue
        try:
            datasets.load_dataset_builder(path, name)
        except Exception as err:  # noqa: BLE001 - whichever way the hub fails, the run cannot evaluate this task
            detail = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
            why = ("HF_HUB_OFFLINE=1 is set and it is not in the local datasets cache" if offline else
                   "the hub is unreachable and it is not in the local datasets cache" if _is_network_error(err) else
                   "it cannot be loaded")
            raise ValueError(f"eval.tasks: {task!r} reads the hub dataset {path!r}"
                             f"{f' ({name})' if name else ''}: {why} ({type(err).__name__}: {detail}); run once "
                             f"with hub access to cache it, or use the offline tasks (zeroshot=udhr)") from None
        checked[(path, name)] = None
