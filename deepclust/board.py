"""Optional TensorBoard logging (``logger=tensorboard``): the numbers of metrics.jsonl, live, per epoch."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .config import ConfigError

INDEX_KEYS = ("round", "epoch", "global_epoch")  # the step, not a measurement


class TensorBoardLog:
    """Writes every number of a metrics row as a scalar at step global_epoch + 1 (0: the untrained network)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install 'deepclust[tensorboard]'"
                              ) from err
        self.writer = SummaryWriter(str(log_dir))

    def write(self, row: dict[str, Any]) -> None:
        step = int(row.get("global_epoch", -1)) + 1
        for key, value in row.items():
            if key in INDEX_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_board(logger: str, out: Path) -> TensorBoardLog | None:
    """A TensorBoard log in ``out/tensorboard`` for logger=tensorboard; None for metrics.jsonl alone (jsonl)."""
    return TensorBoardLog(out / "tensorboard") if logger == "tensorboard" else None
