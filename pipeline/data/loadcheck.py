"""Stream a split exactly as each rank of the configured world would, and check the plan's promises.

Used by `imagenet-pipeline load` and the demo: it runs the real loader (webdataset + DataLoader
processes + decoding) for every rank in turn on this machine, so no cluster is needed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from pipeline.config import Config
from pipeline.data.loader import IGNORE_LABEL, build_loader
from pipeline.errors import DataError


@dataclass
class LoadReport:
    split: str
    world_size: int
    per_rank_batch: int
    num_samples: int
    steps_per_rank: dict[int, list[int]] = field(default_factory=dict)  # rank -> steps per epoch
    samples_per_epoch: list[int] = field(default_factory=list)
    corrupt: int = 0
    duplicates: int = 0
    images: int = 0
    seconds: float = 0.0

    @property
    def equal_steps(self) -> bool:
        return len({tuple(steps) for steps in self.steps_per_rank.values()}) == 1

    @property
    def exactly_once(self) -> bool:
        """Eval: every sample once per pass. Train: no sample twice in one epoch."""
        if self.duplicates:
            return False
        if self.split == "train":
            return True
        return all(seen + self.corrupt == self.num_samples for seen in self.samples_per_epoch)

    @property
    def ok(self) -> bool:
        return self.equal_steps and self.exactly_once

    def summary(self) -> str:
        steps = ", ".join(f"rank {rank}: {s}" for rank, s in self.steps_per_rank.items())
        rate = self.images / self.seconds if self.seconds else 0.0
        coverage = "exactly once" if self.split != "train" else "at most once"
        return (
            f"{self.split}: {self.num_samples} samples, world {self.world_size} x batch {self.per_rank_batch}; "
            f"steps per epoch {steps}; samples read per epoch {self.samples_per_epoch}; "
            f"corrupt {self.corrupt}; {rate:.0f} images/s on this machine\n"
            f"equal steps on every rank: {'yes' if self.equal_steps else 'NO'}; "
            f"each sample {coverage}: {'yes' if self.exactly_once else 'NO'}"
        )


def check_loading(config: Config, split: str, epochs: int = 1) -> LoadReport:
    if split not in ("train", "val", "test"):
        raise DataError(f"split {split!r} is not one of train, val, test")
    world = config.scaling.world_size
    batch = config.per_worker_batch_size
    report: LoadReport | None = None
    start = time.perf_counter()
    for epoch in range(epochs):
        seen: Counter[str] = Counter()
        for rank in range(world):
            loader = build_loader(config.data, split, rank=rank, world_size=world, batch_size=batch, seed=config.seed)
            if report is None:
                report = LoadReport(split, world, batch, loader.manifest.num_samples)
            loader.set_epoch(epoch)
            steps = 0
            for batch_data in loader:
                steps += 1
                report.corrupt += int(batch_data.corrupt)
                report.images += int((batch_data.labels != IGNORE_LABEL).sum())
                seen.update(key for key in batch_data.keys if key)
            report.steps_per_rank.setdefault(rank, []).append(steps)
        report.samples_per_epoch.append(len(seen))
        report.duplicates += sum(count - 1 for count in seen.values())
    assert report is not None
    report.seconds = time.perf_counter() - start
    return report
