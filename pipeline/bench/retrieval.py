"""Benchmark: Ray Data embedding against a plain in-process forward pass, and faiss query latency.

    imagenet-pipeline bench-retrieval --images 256 --rounds 3
    imagenet-pipeline bench-retrieval --only index --gallery 100000x512
    imagenet-pipeline bench-retrieval --only index --gallery 1000000x2048 --kinds flat,ivf --rounds 2

- embed: the same untrained ResNet-18 checkpoint over the same generated shards, by `embed` (Ray Data: shard
  reading and decoding tasks, `retrieval.embed_workers` model replicas) and by one process running the project's
  loader and the model (`pipeline.features.extract.embed_pass`). Rounds alternate the two paths; images/s is
  reported as median and spread (min-max), with the ratio of the medians.
- knn: what `tracking.knn_every: 1` adds to an epoch, in one process on the same shards: a training epoch, the
  plain val pass and the val pass with k-NN (the val pass plus a forward-only pass over train and an exact
  search), interleaved. The added pass is over train, so its share of an epoch is about that of a forward pass
  in a training step, at any data size.
- index: synthetic unit vectors drawn around 1,000 centres (clustered like learned features, where approximate
  indexes work as they would on real ones), 1,000 queries, k = 10: build time, median per-query latency over the
  rounds, and each approximate kind's recall@10 against exact search. Kinds are measured side by side when all
  their indexes fit in memory together (each holds a copy of the gallery: 8 GB at 1 M x 2048); otherwise one kind
  at a time, which the output says.
Figures are printed; nothing here asserts a speed.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.errors import BenchmarkError
from pipeline.features.index import INDEX_KINDS, IndexSettings, build_index, search

QUERIES = 1000
CENTRES = 1000
TOP_K = 10


def run_retrieval_benchmark(
    work_dir: Path,
    only: str | None,
    images: int,
    rounds: int,
    galleries: list[tuple[int, int]],
    kinds: tuple[str, ...] = INDEX_KINDS,
) -> None:
    if only not in (None, "embed", "knn", "index"):
        raise BenchmarkError(f"--only {only!r}: choose embed, knn or index")
    unknown = [kind for kind in kinds if kind not in INDEX_KINDS]
    if unknown or not kinds:
        raise BenchmarkError(f"--kinds {','.join(kinds)!r}: choose from {', '.join(INDEX_KINDS)}")
    if only in (None, "embed"):
        embed_benchmark(work_dir, images, rounds)
    if only in (None, "knn"):
        knn_benchmark(work_dir, images, rounds)
    if only in (None, "index"):
        for rows, dim in galleries:
            index_benchmark(rows, dim, rounds, ("flat", *[kind for kind in kinds if kind != "flat"]))


def embed_benchmark(work_dir: Path, images: int, rounds: int) -> None:
    from pipeline.data.loader import build_loader
    from pipeline.features.extract import embed_pass, with_features
    from pipeline.retrieval.embed import embed_split

    config, checkpoint = _prepare(work_dir, images)
    ray_rates, plain_rates = [], []
    for _ in range(rounds):
        scratch = Path(tempfile.mkdtemp(dir=work_dir))
        result = embed_split(config, str(checkpoint), "train", output=str(scratch / "out"), progress=False)
        ray_rates.append(result.images_per_second)
        shutil.rmtree(scratch)
        from pipeline.inference.loading import load_model_for_inference

        loaded = load_model_for_inference(str(checkpoint), config, "train")
        started = time.perf_counter()
        loader = build_loader(
            config.data,
            "train",
            rank=0,
            world_size=1,
            batch_size=config.retrieval.embed_batch_size,
            seed=0,
            exactly_once=True,
        )
        features, _ = embed_pass(with_features(loaded.model), loader, torch.device("cpu"))
        plain_rates.append(features.shape[0] / (time.perf_counter() - started))
    print(f"embed {images} images, ResNet-18 @ {config.data.eval_image_size} px, {rounds} interleaved rounds")
    print(f"  embed (Ray Data, {config.retrieval.embed_workers} replicas): {_spread(ray_rates)} images/s")
    print(f"  plain in-process forward pass:         {_spread(plain_rates)} images/s")
    print(f"  ratio of medians: {statistics.median(ray_rates) / statistics.median(plain_rates):.2f}")


def knn_benchmark(work_dir: Path, images: int, rounds: int) -> None:
    from pipeline.data.loader import build_loader
    from pipeline.train.models import build_model
    from pipeline.train.step import RankDevice, Trainee, evaluate, train_one_epoch
    from pipeline.train.worker import evaluate_with_knn

    config, _ = _prepare(work_dir, images)
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"knn_every": 1})})
    rank = RankDevice(rank=0, world_size=1, device=torch.device("cpu"), autocast_dtype=None, channels_last=False)
    common = dict(rank=0, world_size=1, batch_size=config.per_worker_batch_size, seed=config.seed)
    train_loader = build_loader(config.data, "train", **common)
    val_loader = build_loader(config.data, "val", **common)
    num_classes = train_loader.manifest.num_classes
    model = build_model(config.model, num_classes)
    trainee = Trainee.build(model, config.optim, len(train_loader), rank)
    seconds: dict[str, list[float]] = {"train": [], "val": [], "val_knn": []}
    for epoch in range(rounds):
        trainee.state.epoch = epoch  # each round trains the next epoch (its own shuffle)
        for name, run in (
            ("train", lambda: train_one_epoch(trainee, train_loader, config, rank)),
            ("val", lambda: evaluate(model, val_loader, rank, prefix="val")),
            ("val_knn", lambda: evaluate_with_knn(model, val_loader, config, rank, num_classes)),
        ):
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    train, val, knn = (statistics.median(seconds[name]) for name in ("train", "val", "val_knn"))
    print(
        f"knn_every: {train_loader.manifest.num_samples} train / {val_loader.manifest.num_samples} val images, "
        f"{config.model.name} @ {config.data.train_image_size} px, {rounds} interleaved rounds, seconds"
    )
    print(f"  training epoch:       {_spread(seconds['train'], '.2f')}")
    print(f"  val pass:             {_spread(seconds['val'], '.2f')}")
    print(f"  val pass with k-NN:   {_spread(seconds['val_knn'], '.2f')}")
    print(
        f"  knn_every: 1 adds {knn - val:.2f} s to an epoch of {train + val:.2f} s "
        f"({100 * (knn - val) / (train + val):.0f} %)"
    )


def _prepare(work_dir: Path, images: int):
    """Shards of generated JPEGs and an untrained ResNet-18 checkpoint (speed does not depend on the weights)."""
    from pipeline.data.sharding import shard_imagenet
    from pipeline.data.synthetic import generate_imagenet_folder
    from pipeline.train.checkpoints import TrainingState, checkpoint_meta, save_checkpoint
    from pipeline.train.models import build_model

    work_dir.mkdir(parents=True, exist_ok=True)
    shards = work_dir / f"shards-{images}"
    config = load_config(
        overrides=[
            f"data.root={shards}",
            "data.eval_image_size=112",
            "data.train_image_size=112",
            "model.name=resnet18",
            "data.loader_workers=1",
            f"retrieval.output={work_dir / 'embeddings'}",
        ]
    )
    if not (shards / "train" / "manifest.json").is_file():
        per_class = max(1, images // 4)
        generate_imagenet_folder(
            work_dir / f"source-{images}",
            num_classes=4,
            train_per_class=per_class,
            val_per_class=2,
            width=500,
            height=375,
            seed=0,
        )
        shard_imagenet(
            work_dir / f"source-{images}", shards, val_per_class=1, samples_per_shard=64, seed=0, progress=False
        )
    checkpoint = work_dir / "checkpoint"
    checkpoint.mkdir(exist_ok=True)
    model = build_model(config.model, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(
        checkpoint,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=None,
        state=TrainingState(),
        meta=checkpoint_meta(config, 4, "bench"),
    )
    return config, checkpoint


def index_benchmark(rows: int, dim: int, rounds: int, kinds: tuple[str, ...]) -> None:
    """`kinds` starts with flat: exact search is the reference every approximate kind's recall is measured against."""
    import psutil

    gallery, queries = _clustered(rows, dim)
    together = len(kinds) * gallery.nbytes * 1.1 < psutil.virtual_memory().available
    print(
        f"faiss, {rows:,} x {dim} gallery, {QUERIES} queries, k = {TOP_K}, {rounds} rounds"
        + (
            ""
            if together
            else f"; one kind at a time: {len(kinds)} indexes of "
            f"{gallery.nbytes / 2**30:.1f} GiB do not fit in memory together"
        )
    )
    groups = [kinds] if together else [(kind,) for kind in kinds]
    latencies: dict[str, list[float]] = {kind: [] for kind in kinds}
    found: dict[str, np.ndarray] = {}
    for group in groups:
        indexes = {kind: _timed_build(gallery, kind) for kind in group}
        for _ in range(rounds):
            for kind, index in indexes.items():  # interleaved: drifting load hits every kind alike
                started = time.perf_counter()
                found[kind] = search(index, queries, TOP_K)[1]
                latencies[kind].append(1000.0 * (time.perf_counter() - started) / QUERIES)
        del indexes, index  # frees this group's copies of the gallery before the next group is built
    exact = found["flat"]
    for kind in kinds:
        recall = np.mean([len(set(a) & set(e)) / TOP_K for a, e in zip(found[kind], exact)])
        print(f"  {kind:5s} {_spread(latencies[kind], '.3f')} ms per query, recall@{TOP_K} vs exact {recall:.3f}")


def _timed_build(gallery: np.ndarray, kind: str):
    started = time.perf_counter()
    index = build_index(gallery, IndexSettings(kind=kind))
    print(f"  {kind:5s} built in {time.perf_counter() - started:7.1f} s", flush=True)
    return index


def _clustered(rows: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CENTRES, dim), dtype=np.float32)
    gallery = np.empty((rows, dim), dtype=np.float32)
    for start in range(0, rows, 65536):  # in blocks: bounds the temporary arrays at 1 M x 2048
        stop = min(rows, start + 65536)
        gallery[start:stop] = centres[rng.integers(0, CENTRES, stop - start)]
        gallery[start:stop] += 0.7 * rng.standard_normal((stop - start, dim), dtype=np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = centres[rng.integers(0, CENTRES, QUERIES)] + 0.7 * rng.standard_normal((QUERIES, dim), dtype=np.float32)
    return gallery, queries / np.linalg.norm(queries, axis=1, keepdims=True)


def _spread(values: list[float], fmt: str = ".1f") -> str:
    return f"{statistics.median(values):{fmt}} (min {min(values):{fmt}}, max {max(values):{fmt}})"
