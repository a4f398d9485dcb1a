"""Embed a shard split with any trained model: distributed batch inference on Ray Data, then the faiss index.

    imagenet-pipeline embed --model models:/imagenet-classifier@champion --split train
    ray job submit --working-dir . -- python -m jobs.embed -c jobs/configs/demo.yaml --split train

The stages: one row per shard -> whole shards read in tasks (raw bytes, as the manifest counts them) -> JPEG
decoding and the model's centre crop in CPU tasks -> a fixed pool of `retrieval.embed_workers` model replicas
(actors; one GPU each when `scaling.use_gpu`) -> the driver, which places each vector at its manifest position.
Every sample exactly once: a position filled twice or never is an error and nothing is written. The output
(`pipeline.features.store`) is complete or absent, and records the index file's sha256, which every reader checks
before faiss parses the file; the same model version, split and data reuse an output that passes the reader's
checks, and anything else (an older format, a damaged folder) is embedded again in its place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import storage
from pipeline.config import Config, refuse_job_copy
from pipeline.data.manifest import SPLITS, Manifest, file_sha256
from pipeline.data.shard_reader import read_whole_shard
from pipeline.data.transforms import CorruptImageError, EvalTransform, normalize_batch
from pipeline.errors import ConfigError, DataError, ModelSourceError
from pipeline.features import store
from pipeline.features.extract import feature_spec, with_features
from pipeline.features.index import INDEX_FILE, IndexSettings, build_index, save_index
from pipeline.inference.loading import (
    PinnedSource,
    class_count_mismatch,
    load_model_for_inference,
    pin_model_source,
    split_manifest,
)

ROW_BLOCK = 256  # rows per batch the driver takes from Ray Data


@dataclass
class EmbedResult:
    directory: Path
    meta: store.EmbeddingMeta
    reused: bool
    images_per_second: float | None  # None when reused
    index_run_id: str | None = None  # the MLflow run holding the index artifacts


def embed_split(
    config: Config, source: str, split: str, output: str | None = None, progress: bool = True
) -> EmbedResult:
    """Embed every sample of `config.data.root/<split>` with the model behind `source`; build its index."""
    if split not in SPLITS:
        raise ConfigError(f"split = {split!r}: choose one of {', '.join(SPLITS)}")
    manifest = split_manifest(config, split)
    if manifest.num_samples == 0:
        raise DataError(f"{storage.join(config.data.root, split)}: the manifest lists no samples to embed")
    pinned = pin_model_source(source, config)
    directory = (
        Path(output) if output else store.default_output(config.retrieval.output, pinned.source, pinned.version, split)
    )
    refuse_job_copy(
        "retrieval.output" if output is None else "--output",
        str(directory.absolute()),
        "the gallery would be deleted with the job",
    )
    loaded = load_model_for_inference(pinned.source, config, split)
    if len(loaded.class_names) != manifest.num_classes:
        raise ModelSourceError(class_count_mismatch(source, len(loaded.class_names), config, split, manifest))
    spec = feature_spec(loaded.architecture, loaded.model)
    meta = store.EmbeddingMeta(
        model_source=pinned.source,
        model_version=pinned.version,
        model_run_id=pinned.run_id,
        architecture=spec.architecture,
        layer=spec.layer,
        dim=spec.dim,
        split=split,
        data_root=storage.absolute(config.data.root),
        manifest_hash=manifest.content_hash(),
        num_samples=manifest.num_samples,
        unreadable=0,
        class_names=loaded.class_names,
        shard_counts=manifest.shard_counts,
    )
    previous = _complete_output(directory)
    if previous is not None and previous.same_inputs(meta):
        return EmbedResult(directory, previous, reused=True, images_per_second=None)
    started = time.perf_counter()
    with store.staged(directory) as folder:
        vectors = np.lib.format.open_memmap(
            folder / store.EMBEDDINGS_FILE, mode="w+", dtype=np.float32, shape=(manifest.num_samples, spec.dim)
        )
        labels, positions, keys = _collect(config, pinned, split, manifest, loaded.eval_image_size, vectors, progress)
        vectors.flush()
        readable = np.flatnonzero(labels >= 0)
        if readable.size == 0:
            raise DataError(
                f"{storage.join(config.data.root, split)}: no sample could be read; the gallery would be empty"
            )
        settings = IndexSettings(
            kind=config.retrieval.index,
            nlist=config.retrieval.ivf_nlist,
            nprobe=config.retrieval.ivf_nprobe,
            hnsw_m=config.retrieval.hnsw_m,
        )
        index_sha256 = save_index(build_index(vectors[readable], settings, readable), folder / INDEX_FILE)
        store.write_arrays(folder, labels, positions, keys)
        meta = store.EmbeddingMeta(
            **{
                **meta.__dict__,
                "unreadable": int(manifest.num_samples - readable.size),
                "index_sha256": index_sha256,
                "created": time.time(),
            }
        )
        store.write_meta(folder, meta)
    rate = manifest.num_samples / (time.perf_counter() - started)
    return EmbedResult(directory, meta, reused=False, images_per_second=rate)


def _complete_output(directory: Path) -> store.EmbeddingMeta | None:
    """An earlier output's meta.json when its row files and index pass the reader's checks; None when there is
    none, or it is of an older format or damaged: embedding again replaces it."""
    if not (directory / INDEX_FILE).is_file():
        return None
    try:
        meta = store.read_rows(directory)[0]
    except DataError:
        return None
    return meta if file_sha256(directory / INDEX_FILE) == meta.index_sha256 else None


def _collect(
    config: Config,
    pinned: PinnedSource,
    split: str,
    manifest: Manifest,
    image_size: int,
    vectors: np.ndarray,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Run the Ray Data pipeline; fill `vectors` in manifest order; return labels, positions and keys."""
    import ray
    import ray.data
    from tqdm import tqdm

    from pipeline.cluster.session import ensure_ray

    ensure_ray()
    counts = manifest.shard_counts
    offsets = np.concatenate([[0], np.cumsum(counts)])[:-1]
    total = manifest.num_samples
    labels = np.full(total, -1, dtype=np.int64)
    positions = np.zeros((total, 2), dtype=np.int64)
    keys = [""] * total
    filled = np.zeros(total, dtype=np.int32)
    retrieval = config.retrieval
    replicas = replicas_that_fit(config, ray.cluster_resources())
    split_dir = storage.join(config.data.root, split)
    dataset = (
        ray.data.from_items([{"shard": shard} for shard in range(len(counts))], override_num_blocks=len(counts))
        .flat_map(
            _read_shard,
            fn_kwargs={"split_dir": split_dir, "manifest": manifest, "shard_command": config.data.shard_command},
        )
        .map_batches(
            _decode,
            fn_kwargs={
                "image_size": image_size,
                "crop_ratio": config.data.eval_crop_ratio,
                "max_image_pixels": config.data.max_image_pixels,
            },
            batch_size=retrieval.embed_batch_size,
            batch_format="numpy",
            num_cpus=retrieval.decode_cpus,
        )
        .map_batches(
            _Replica,
            fn_constructor_kwargs={"source": pinned.source, "config": config, "split": split},
            batch_size=retrieval.embed_batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=replicas),
            num_gpus=1 if config.scaling.use_gpu else 0,
            num_cpus=config.scaling.cpus_per_worker,
        )
    )
    with tqdm(total=total, unit="img", desc=f"embed {split}", disable=not progress) as bar:
        for batch in dataset.iter_batches(batch_size=ROW_BLOCK, batch_format="numpy"):
            shard, index = batch["shard"].astype(np.int64), batch["index"].astype(np.int64)
            if ((index < 0) | (index >= np.asarray(counts)[shard])).any():
                raise DataError(f"{split_dir}: a shard yielded a sample beyond its manifest count")
            rows = offsets[shard] + index
            np.add.at(filled, rows, 1)
            vectors[rows] = batch["vector"]
            labels[rows] = batch["label"]
            positions[rows, 0], positions[rows, 1] = shard, index
            for row, key in zip(rows.tolist(), batch["key"].tolist()):
                keys[row] = key
            bar.update(len(rows))
    if (filled != 1).any():
        twice, never = int((filled > 1).sum()), int((filled == 0).sum())
        raise DataError(
            f"{split_dir}: embedding was not exactly once ({twice} samples seen more than once, "
            f"{never} never, of {total} in the manifest); nothing was written"
        )
    return labels, positions, keys


def replicas_that_fit(config: Config, resources: dict[str, float]) -> int:
    """Model replicas the cluster can hold while one reading/decoding task still runs: a pool that takes every
    CPU starves the tasks that feed it, and the embedding never finishes."""
    retrieval, scaling = config.retrieval, config.scaling
    cpus = float(resources.get("CPU", 0.0))
    if scaling.use_gpu:
        return max(1, min(retrieval.embed_workers, int(resources.get("GPU", 0.0)) or 1))
    room = int((cpus - retrieval.decode_cpus) // scaling.cpus_per_worker)
    if room < 1:
        raise ConfigError(
            f"the Ray cluster has {cpus:g} CPUs: one model replica (scaling.cpus_per_worker = "
            f"{scaling.cpus_per_worker:g}) plus a decoding task (retrieval.decode_cpus = "
            f"{retrieval.decode_cpus:g}) do not fit; lower them"
        )
    return min(retrieval.embed_workers, room)


def _read_shard(row: dict, split_dir: str, manifest: Manifest, shard_command: str | None) -> list[dict]:
    shard = int(row["shard"])
    return [
        {"shard": shard, "index": index, "key": key, "label": label, "image": image or b""}
        for index, (image, label, key) in enumerate(read_whole_shard(split_dir, manifest, shard, shard_command))
    ]


def _decode(
    batch: dict[str, np.ndarray], image_size: int, crop_ratio: float, max_image_pixels: int
) -> dict[str, np.ndarray]:
    transform = EvalTransform(image_size, crop_ratio, max_image_pixels)
    labels = batch["label"].astype(np.int64).copy()
    pixels = np.zeros((len(labels), 3, image_size, image_size), dtype=np.uint8)
    for row, data in enumerate(batch["image"]):
        if labels[row] < 0:
            continue
        try:
            pixels[row] = transform(bytes(data)).numpy()
        except CorruptImageError:
            labels[row] = -1
    return {"shard": batch["shard"], "index": batch["index"], "key": batch["key"], "label": labels, "pixels": pixels}


class _Replica:
    """One model replica of the actor pool: loads the pinned model once, then embeds batch after batch."""

    def __init__(self, source: str, config: Config, split: str) -> None:
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
        self.device = torch.device("cuda" if config.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        loaded = load_model_for_inference(source, config, split)
        self.net = with_features(loaded.model.to(self.device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = normalize_batch(torch.from_numpy(np.ascontiguousarray(batch["pixels"])), self.device)
        with torch.inference_mode():
            _, features = self.net(images)
        vectors = features.cpu().numpy()
        vectors[batch["label"] < 0] = 0.0  # unreadable: never a neighbour (left out of the index too)
        return {
            "shard": batch["shard"],
            "index": batch["index"],
            "key": batch["key"],
            "label": batch["label"],
            "vector": vectors,
        }
