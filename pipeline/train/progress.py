"""Rank-aware output: every rank may log, only rank 0 prints the per-epoch table and summaries."""

from __future__ import annotations

import logging
import sys

from pipeline import metrics as m


class RankLogger:
    """Prefixes lines with the rank; `info` is silent on ranks other than 0 unless `all_ranks`."""

    def __init__(self, rank: int, name: str = "pipeline") -> None:
        self.rank = rank
        self._logger = logging.getLogger(f"{name}.rank{rank}")
        if not self._logger.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
            self._logger.addHandler(handler)
            self._logger.setLevel(logging.INFO)
            self._logger.propagate = False

    def info(self, message: str, all_ranks: bool = False) -> None:
        if self.rank == 0 or all_ranks:
            self._logger.info(message)

    def warning(self, message: str) -> None:
        self._logger.warning(message)


# (metric, header, format): one line per epoch.
_COLUMNS = [
    (m.EPOCH, "epoch", "{:>5.0f}"),
    (m.TRAIN_LOSS, "train loss", "{:>10.4f}"),
    (m.VAL_LOSS, "val loss", "{:>8.4f}"),
    (m.VAL_TOP1, "top-1 %", "{:>7.2f}"),
    (m.VAL_TOP5, "top-5 %", "{:>7.2f}"),
    (m.TRAIN_LR, "lr", "{:>9.2e}"),
    (m.TRAIN_IMAGES_PER_SECOND, "images/s", "{:>8.1f}"),
    (m.TRAIN_DATA_WAIT_SHARE, "data wait", "{:>9.0%}"),
]


class EpochTable:
    def __init__(self, log: RankLogger) -> None:
        self.log = log
        self._printed_header = False

    def row(self, epoch_metrics: dict[str, float]) -> None:
        if not self._printed_header:
            self.log.info("  ".join(f"{header:>{len(fmt.format(0))}}" for _, header, fmt in _COLUMNS))
            self._printed_header = True
        self.log.info("  ".join(fmt.format(epoch_metrics.get(key, float("nan"))) for key, _, fmt in _COLUMNS))
