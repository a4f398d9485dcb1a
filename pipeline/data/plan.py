"""Exact epoch plans: which samples each rank and DataLoader process reads, computed without communication.

Every rank evaluates the same pure function of (per-shard counts, world size, batch, seed, epoch), so
the plans agree by construction. This replaces webdataset's `split_by_node` (ranks get different sample
counts and DDP hangs), `resampled=True` (an epoch covers ~63 % of the data) and `with_epoch` (the tail of
plain shards is never reached).

Train: every rank gets exactly `steps * batch` samples; the `remainder` (< world * batch) that does not
fill a global step is a window that slides through the data epoch by epoch, so no sample is always
skipped. Shard order is shuffled per (seed, epoch); the loader adds a seeded in-process shuffle buffer.

Eval (val/test): every sample exactly once over all ranks; ranks with one sample fewer get a masked
padding sample so all ranks run the same number of steps and the summed counts stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import DataError


@dataclass(frozen=True)
class Segment:
    """A contiguous run of samples inside one shard: offsets [start, stop) in file order."""

    shard: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class WorkerPlan:
    """What one DataLoader process of one rank reads in one epoch, in order."""

    segments: tuple[Segment, ...]
    num_padding: int  # masked placeholder samples appended after the real ones (eval only)
    batch_sizes: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(segment.length for segment in self.segments)


def train_steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Optimizer steps per epoch; identical on every rank. `batch_size` is per rank."""
    steps = num_samples // (world_size * batch_size)
    if steps == 0:
        raise DataError(
            f"the train split has {num_samples} samples, fewer than one global batch "
            f"({world_size} workers x {batch_size} per worker); lower optim.batch_size"
        )
    return steps


def eval_steps_per_pass(num_samples: int, world_size: int, batch_size: int) -> int:
    per_rank = -(-num_samples // world_size)
    return -(-per_rank // batch_size)


def plan_train_worker(
    shard_counts: list[int],
    *,
    world_size: int,
    rank: int,
    batch_size: int,
    seed: int,
    epoch: int,
    worker: int = 0,
    num_workers: int = 1,
) -> WorkerPlan:
    _check_position(world_size, rank, worker, num_workers)
    total = sum(shard_counts)
    steps = train_steps_per_epoch(total, world_size, batch_size)
    per_rank = steps * batch_size
    remainder = total - per_rank * world_size
    rng = np.random.default_rng([seed, epoch])
    shard_order = rng.permutation(len(shard_counts))
    # The skipped window lives in canonical (file) order and moves by `remainder` each epoch, so
    # consecutive epochs skip disjoint samples and every sample is trained on within a few epochs.
    skip_start = (epoch * remainder) % total if total else 0
    stream = _stream_without_window(shard_counts, shard_order, skip_start, remainder)
    first_batch, worker_batches = _worker_batch_block(steps, worker, num_workers)
    rank_offset = rank * per_rank
    segments = _slice_stream(stream, rank_offset + first_batch * batch_size, worker_batches * batch_size)
    return WorkerPlan(segments=segments, num_padding=0, batch_sizes=(batch_size,) * worker_batches)


def plan_eval_worker(
    shard_counts: list[int],
    *,
    world_size: int,
    rank: int,
    batch_size: int,
    worker: int = 0,
    num_workers: int = 1,
) -> WorkerPlan:
    _check_position(world_size, rank, worker, num_workers)
    total = sum(shard_counts)
    padded_per_rank = -(-total // world_size)
    rank_start, rank_stop = rank * total // world_size, (rank + 1) * total // world_size
    steps = -(-padded_per_rank // batch_size)
    sizes = [batch_size] * steps
    if steps:
        sizes[-1] = padded_per_rank - (steps - 1) * batch_size
    first_batch, worker_batches = _worker_batch_block(steps, worker, num_workers)
    begin = sum(sizes[:first_batch])
    end = begin + sum(sizes[first_batch : first_batch + worker_batches])
    real_count = rank_stop - rank_start
    real_end = min(end, real_count)
    stream = _stream_without_window(shard_counts, np.arange(len(shard_counts)), 0, 0)
    segments = _slice_stream(stream, rank_start + begin, max(0, real_end - begin))
    padding = (end - begin) - max(0, real_end - begin)
    return WorkerPlan(
        segments=segments,
        num_padding=padding,
        batch_sizes=tuple(sizes[first_batch : first_batch + worker_batches]),
    )


def _check_position(world_size: int, rank: int, worker: int, num_workers: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise DataError(f"DataLoader worker {worker} is outside {num_workers} workers")


def _worker_batch_block(num_batches: int, worker: int, num_workers: int) -> tuple[int, int]:
    """Contiguous block of batches for one DataLoader process: each reads its shards once, in order."""
    base, extra = divmod(num_batches, num_workers)
    count = base + (1 if worker < extra else 0)
    first = worker * base + min(worker, extra)
    return first, count


def _stream_without_window(
    shard_counts: list[int],
    shard_order: np.ndarray,
    skip_start: int,
    skip_length: int,
) -> list[Segment]:
    """Segments of all shards in `shard_order`, minus the circular canonical window being skipped."""
    total = sum(shard_counts)
    skipped: list[tuple[int, int]] = []
    if skip_length:
        end = skip_start + skip_length
        skipped = [(skip_start, min(end, total))] + ([(0, end - total)] if end > total else [])
    shard_starts = np.concatenate([[0], np.cumsum(shard_counts)[:-1]]).astype(int) if shard_counts else []
    stream: list[Segment] = []
    for shard in shard_order:
        lo, hi = int(shard_starts[shard]), int(shard_starts[shard]) + shard_counts[shard]
        pieces = [(lo, hi)]
        for skip_lo, skip_hi in skipped:
            pieces = [p for piece in pieces for p in _subtract(piece, (skip_lo, skip_hi))]
        stream.extend(Segment(int(shard), a - lo, b - lo) for a, b in pieces if b > a)
    return stream


def _subtract(piece: tuple[int, int], cut: tuple[int, int]) -> list[tuple[int, int]]:
    (a, b), (c, d) = piece, cut
    if d <= a or c >= b:
        return [piece]
    return [p for p in ((a, c), (d, b)) if p[1] > p[0]]


def _slice_stream(stream: list[Segment], offset: int, length: int) -> tuple[Segment, ...]:
    """Stream positions [offset, offset + length) as segments."""
    out: list[Segment] = []
    position = 0
    end = offset + length
    for segment in stream:
        seg_lo, seg_hi = position, position + segment.length
        position = seg_hi
        if seg_hi <= offset:
            continue
        if seg_lo >= end:
            break
        lo, hi = max(seg_lo, offset), min(seg_hi, end)
        out.append(Segment(segment.shard, segment.start + lo - seg_lo, segment.start + hi - seg_lo))
    return tuple(out)
