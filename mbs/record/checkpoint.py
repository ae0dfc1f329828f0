"""Saving the compressed model as a transformers checkpoint (safetensors + config + tokenizer), so it can be reloaded
with ``AutoModelForCausalLM.from_pretrained`` and evaluated or exported elsewhere."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

log = logging.getLogger(__name__)


def save_checkpoint(model: nn.Module, tokenizer: Any, directory: str | Path) -> Path:
    """Write the model in its current dtype (pruned weights stay zero, fake-quantized weights stay on their grid)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    log.info("saved the compressed model to %s", directory)
    return directory
