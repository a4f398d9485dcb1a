"""Streams a rank's share of webdataset shards into uint8 batches through a torch DataLoader.

The plan (`pipeline.data.plan`) fixes exactly which samples each DataLoader process reads; this module
reads them (`pipeline.data.shard_reader`: only their bytes where shards are indexed), shuffles (train), decodes
and batches. Batches are built inside the
dataset so every process yields whole batches with sizes fixed by the plan: a corrupt or missing
sample becomes a masked slot (label IGNORE_LABEL) and never changes a rank's step count.

    loader = build_loader(config.data, "train", rank=0, world_size=2, batch_size=64, seed=0)
    loader.set_epoch(3)
    for batch in loader: ...   # Batch(images uint8 NCHW, labels int64, corrupt count)
    loader.set_epoch(3, start_step=40)   # the same epoch from its 41st batch on (a mid-epoch resume)

Every random choice is a pure function of (seed, epoch, rank, plan worker, batch): the shuffle of a worker's
samples is drawn on their positions before anything is read, and each batch's augmentation has its own stream.
So a pass that starts at step k yields exactly the batches k, k+1, ... of the full pass, reading only their bytes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import storage
from pipeline.config import DataConfig
from pipeline.data.manifest import Manifest, combine_manifests, read_manifest
from pipeline.data.plan import (
    Segment,
    WorkerPlan,
    eval_steps_per_pass,
    plan_eval_worker,
    plan_train_worker,
    train_steps_per_epoch,
)
from pipeline.data.shard_reader import UNREADABLE, Sample, read_positions
from pipeline.data.transforms import (
    CorruptImageError,
    EncodedImage,
    EvalTransform,
    TrainTransform,
    decode_on_device,
    prepare_for_device,
)
from pipeline.errors import DataError

# CrossEntropyLoss(ignore_index=IGNORE_LABEL) skips masked slots; accuracy counts skip labels < 0.
IGNORE_LABEL = -100


class Batch(NamedTuple):
    images: torch.Tensor | None  # uint8, (N, 3, S, S); normalise on the device with transforms.normalize_batch
    labels: torch.Tensor  # int64, IGNORE_LABEL for masked slots (corrupt samples and eval padding)
    keys: list[str]  # webdataset __key__ per slot ("" for masked slots): for audits and retrieval
    corrupt_shards: tuple[int, ...] = ()  # manifest shard index of each sample that could not be read or decoded
    # data.decode = gpu, between a loader process and EpochLoader (which decodes on the device and fills
    # `images`): each slot's bytes and geometry (None: masked), and the manifest shard each slot came from.
    encoded: tuple[EncodedImage | None, ...] | None = None
    slot_shards: tuple[int, ...] = ()

    @property
    def corrupt(self) -> int:
        return len(self.corrupt_shards)


class ShardStream(IterableDataset):
    """One rank's view of a split. DataLoader processes each take their block of the rank's plan."""

    def __init__(
        self,
        locations: list[str],
        manifest: Manifest,
        *,
        train: bool,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int,
        data: DataConfig,
    ) -> None:
        self.locations = locations  # each manifest shard's local path or URL (pipeline.storage)
        self.shard_command = data.shard_command
        self.manifest = manifest
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_buffer = data.shuffle_buffer
        self.decode_on_device = data.decode == "gpu"
        self.image_size = data.train_image_size if train else data.eval_image_size
        self.transform = (
            TrainTransform(data.train_image_size, data.min_crop_scale, data.max_image_pixels)
            if train
            else EvalTransform(data.eval_image_size, data.eval_crop_ratio, data.max_image_pixels)
        )
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        if start_step and not self.train:
            raise DataError(f"start_step = {start_step}: an eval pass always starts at its first batch")
        self.epoch = epoch
        self.start_step = start_step

    def plan(self, worker: int = 0, num_workers: int = 1) -> WorkerPlan:
        counts = self.manifest.shard_counts
        if self.train:
            return plan_train_worker(
                counts,
                world_size=self.world_size,
                rank=self.rank,
                batch_size=self.batch_size,
                seed=self.seed,
                epoch=self.epoch,
                worker=worker,
                num_workers=num_workers,
            )
        return plan_eval_worker(
            counts,
            world_size=self.world_size,
            rank=self.rank,
            batch_size=self.batch_size,
            worker=worker,
            num_workers=num_workers,
        )

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        process, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # DataLoader takes batches from its processes in turn, starting at process 0, so step s of a pass is plan
        # worker s mod n's batch s // n. A pass resumed at step k starts at process 0 too: process i plays plan
        # worker (i + k) mod n, whose next batch is the one step k would have taken, and skips what it gave.
        worker = (process + self.start_step) % num_workers
        given = self.start_step // num_workers + int(worker < self.start_step % num_workers)
        plan = self.plan(worker, num_workers)
        if given > len(plan.batch_sizes):
            raise DataError(
                f"start_step = {self.start_step}: past the end of the epoch "
                f"({len(plan.batch_sizes) * num_workers}+ steps)"
            )
        order: list[int] | range = range(plan.num_samples)
        if self.train:  # the shuffle buffer's order, drawn on positions: no sample is read to know it
            order = list(
                _shuffled(
                    iter(order), self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
                )
            )
        order = order[sum(plan.batch_sizes[:given]) :]
        samples = _in_order(
            read_positions(self.locations, self.manifest, self.shard_command, plan.segments, order), order
        )
        padding = (Sample(None, IGNORE_LABEL) for _ in range(plan.num_padding))
        stream = _chain(samples, padding)
        for batch in range(given, len(plan.batch_sizes)):
            rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}/{batch}")
            yield self._decode_batch([next(stream) for _ in range(plan.batch_sizes[batch])], rng)

    def _read(self, segments: tuple[Segment, ...]) -> Iterator[Sample]:
        """Every sample of `segments`, in order."""
        count = sum(segment.length for segment in segments)
        return (
            sample
            for _, sample in read_positions(self.locations, self.manifest, self.shard_command, segments, range(count))
        )

    def _decode_batch(self, samples: list[Sample], rng: random.Random) -> Batch:
        if self.decode_on_device:
            return self._prepare_batch(samples, rng)
        images = torch.zeros((len(samples), 3, self.image_size, self.image_size), dtype=torch.uint8)
        labels = torch.full((len(samples),), IGNORE_LABEL, dtype=torch.int64)
        keys = [""] * len(samples)
        corrupt: list[int] = []
        for slot, sample in enumerate(samples):
            if sample.image is None:
                if sample.label == UNREADABLE:  # eval padding is expected, not corrupt
                    corrupt.append(sample.shard)
                continue
            try:
                images[slot] = self.transform(sample.image, rng) if self.train else self.transform(sample.image)
            except CorruptImageError:
                corrupt.append(sample.shard)
                continue
            labels[slot] = sample.label
            keys[slot] = sample.key
        return Batch(images, labels, keys, tuple(corrupt))

    def _prepare_batch(self, samples: list[Sample], rng: random.Random) -> Batch:
        """data.decode = gpu: headers read and geometry drawn here; the pixels are decoded on the device."""
        labels = torch.full((len(samples),), IGNORE_LABEL, dtype=torch.int64)
        keys = [""] * len(samples)
        slots: list[EncodedImage | None] = [None] * len(samples)
        corrupt: list[int] = []
        for slot, sample in enumerate(samples):
            if sample.image is None:
                if sample.label == UNREADABLE:
                    corrupt.append(sample.shard)
                continue
            try:
                slots[slot] = prepare_for_device(sample.image, self.transform, rng)
            except CorruptImageError:
                corrupt.append(sample.shard)
                continue
            labels[slot] = sample.label
            keys[slot] = sample.key
        return Batch(
            None,
            labels,
            keys,
            tuple(corrupt),
            encoded=tuple(slots),
            slot_shards=tuple(sample.shard for sample in samples),
        )


def on_device(batch: Batch, device: torch.device, train: bool, image_size: int, max_image_pixels: int) -> Batch:
    """A batch from `_prepare_batch` decoded on `device`: images filled in (on the device), and what failed to
    decode there (or declares more than `max_image_pixels`) masked and counted as corrupt, exactly as the CPU
    route masks it."""
    if batch.encoded is None:
        return batch
    live = [index for index, slot in enumerate(batch.encoded) if slot is not None]
    decoded = decode_on_device([batch.encoded[i] for i in live], train, image_size, device, max_image_pixels)
    images = torch.zeros((len(batch.labels), 3, image_size, image_size), dtype=torch.uint8, device=device)
    labels, keys, corrupt = batch.labels.clone(), list(batch.keys), list(batch.corrupt_shards)
    for index, image in zip(live, decoded):
        if image is None:
            labels[index], keys[index] = IGNORE_LABEL, ""
            corrupt.append(batch.slot_shards[index])
        else:
            images[index] = image
    return Batch(images, labels, keys, tuple(corrupt))


def _shuffled(samples: Iterator[Sample], buffer_size: int, rng: random.Random) -> Iterator[Sample]:
    buffer: list[Sample] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def _in_order(pairs: Iterator[tuple[int, Sample]], order: list[int] | range) -> Iterator[Sample]:
    """The samples of `pairs` (read in position order) re-ordered as `order`: it holds what was read ahead of its
    turn, as many samples as the shuffle buffer would hold."""
    held: dict[int, Sample] = {}
    for position in order:
        while position not in held:
            got, sample = next(pairs)
            held[got] = sample
        yield held.pop(position)


def _chain(*iterators: Iterator[Sample]) -> Iterator[Sample]:
    for iterator in iterators:
        yield from iterator


class EpochLoader:
    """A DataLoader per epoch: workers are re-created so each sees the epoch number (no hidden state)."""

    def __init__(
        self, dataset: ShardStream, data: DataConfig, pin_memory: bool, decode_device: torch.device | None = None
    ) -> None:
        self.dataset = dataset
        # data.decode = gpu: where this (the training) process decodes the loader processes' encoded batches.
        self.decode_device = decode_device or torch.device("cpu")
        self.loader_workers = data.loader_workers
        self.prefetch_batches = data.prefetch_batches
        # Encoded batches are not pinned: decode_jpeg copies each JPEG to the GPU itself, and pinning 256 small
        # tensors a batch would only add a host copy of every byte.
        self.pin_memory = pin_memory and not dataset.decode_on_device
        # Samples of the current pass that could not be read, per manifest shard: the loader processes report
        # them batch by batch, and a run stopped for corruption names the shards from these counts.
        self.corrupt_counts = torch.zeros(len(dataset.manifest.shards), dtype=torch.float64)

    @property
    def manifest(self) -> Manifest:
        return self.dataset.manifest

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next pass is `epoch`'s, from batch `start_step` on (0: the whole epoch)."""
        if start_step and start_step >= len(self):  # said here, not inside a loader process (a multi-line trace)
            raise DataError(
                f"start_step = {start_step}: this pass has only {len(self)} steps per rank; was the "
                "checkpoint written with another world size, batch or data?"
            )
        self.dataset.set_epoch(epoch, start_step)

    def __len__(self) -> int:
        """Batches per epoch on this rank; identical on every rank."""
        total, world, batch = self.manifest.num_samples, self.dataset.world_size, self.dataset.batch_size
        if self.dataset.train:
            return train_steps_per_epoch(total, world, batch)
        return eval_steps_per_pass(total, world, batch)

    def __iter__(self) -> Iterator[Batch]:
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.loader_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_batches if self.loader_workers else None,
            # Each new iterator draws its processes' base seed from this generator: from the global one it would
            # shift the training process's dropout masks whenever a pass starts (a resume within an epoch starts
            # one where an uninterrupted run did not). Every random choice here has its own stream anyway.
            generator=torch.Generator().manual_seed(0),
        )
        self.corrupt_counts.zero_()
        for batch in loader:
            batch = on_device(
                batch,
                self.decode_device,
                self.dataset.train,
                self.dataset.image_size,
                self.dataset.transform.max_image_pixels,
            )
            for shard in batch.corrupt_shards:
                self.corrupt_counts[shard] += 1
            yield batch


def build_loader(
    data: DataConfig,
    split: str | list[str],
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    pin_memory: bool = False,
    exactly_once: bool = False,
    decode_device: torch.device | None = None,
) -> EpochLoader:
    """`batch_size` is per rank. `split` is train (shuffled, augmented, equal steps) or val/test (every sample
    exactly once, centre crops); `exactly_once` reads the train split that way too (to embed it).

    A list of splits starting with train (`data.fit_splits` of a refit: [train, val]) is read as one training
    split: one plan over all their shards, so every epoch covers both exactly as it would cover train alone.

    With `data.decode: gpu` the loader processes only read bytes and draw crops; batches are decoded on
    `decode_device` (the training process's GPU) as they are taken from the loader."""
    splits = [split] if isinstance(split, str) else list(split)
    manifests = [read_manifest(storage.join(data.root, name), data.shard_url_schemes) for name in splits]
    manifest = manifests[0] if len(manifests) == 1 else combine_manifests(manifests)
    locations = [
        storage.shard_location(storage.join(data.root, name), shard.name)
        for name, one in zip(splits, manifests)
        for shard in one.shards
    ]
    dataset = ShardStream(
        locations,
        manifest,
        train=splits[0] == "train" and not exactly_once,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        seed=seed,
        data=data,
    )
    return EpochLoader(dataset, data, pin_memory, decode_device)
