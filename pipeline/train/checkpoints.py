"""Checkpoint contents: everything needed to continue a run exactly where it stopped.

A checkpoint directory holds `state.pt` (model, optimiser, scheduler, grad scaler, RNG states, epoch,
global step, metric history), `meta.json` (model name, class count, manifest hash, resolved config), which is
small and readable without torch so the driver can refuse a mismatched resume up front, and `progress.json`
(the epoch it was saved after, the run's per-epoch metrics so far, whether it stopped early): a run's record
(`read_run_record`), read the same way by a sweep's summary, its publishing and a resumed trial.

Each file is written whole (`storage.atomic_write`) and meta.json last, so a folder with meta.json is complete.
Read back, every file is untrusted (shared storage, interrupted copies): each damaged form is one CheckpointError
line naming the checkpoint and the problem (`pipeline.train.checkpoint_checks`), and a resume whose latest
checkpoint is damaged continues from the newest sound one before it (`restore_newest_sound`).
"""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import torch

from pipeline import metrics as m
from pipeline import storage
from pipeline.config import Config
from pipeline.errors import CheckpointError, ConfigError, PipelineError, StorageError, first_line
from pipeline.train import checkpoint_checks as checks
from pipeline.train.checkpoint_checks import META_FILE, PROGRESS_FILE, STATE_FILE

T = TypeVar("T")


@dataclass
class TrainingState:
    """The mutable state of one training run, saved whole in every checkpoint."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per epoch
    best_metric: float | None = None
    epochs_without_improvement: int = 0
    # A checkpoint taken within an epoch (tracking.checkpoint_every_steps): steps of epoch `epoch` + 1 done, and
    # that epoch's sums so far over all ranks (loss sum, valid samples, corrupt samples). 0 and [] at epoch ends.
    step_in_epoch: int = 0
    partial_epoch: list[float] = field(default_factory=list)

    @classmethod
    def from_saved(cls, saved: Any, where: str) -> "TrainingState":
        """The state as a checkpoint saved it, each field checked (`checkpoint_checks.training_state`)."""
        return cls(**checks.training_state(saved, where))


def checkpoint_meta(config: Config, num_classes: int, manifest_hash: str) -> dict[str, Any]:
    return {
        "model": config.model.name,
        "num_classes": num_classes,
        "manifest_hash": manifest_hash,
        "config": config.model_dump(mode="json"),
    }


def rng_state() -> dict[str, Any]:
    """This process's random streams (Python, numpy, torch, CUDA), as tensors and plain values."""
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_as_tensors(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def save_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    state: TrainingState,
    meta: dict[str, Any],
    rng_by_rank: list[dict[str, Any]] | None = None,
    stopped_early: bool = False,
) -> None:
    """`rng_by_rank`: every rank's streams (gathered by the caller), so each rank continues its own on resume.
    `stopped_early`: the run ends after this epoch (early stopping), so a resume has nothing left to train."""
    rng_by_rank = rng_by_rank or [rng_state()]
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "training_state": state.__dict__,
        "rng": rng_by_rank[0],  # rank 0's, as before per-rank streams were kept
        "rng_by_rank": rng_by_rank,
    }
    # meta.json marks a checkpoint complete: gone while the folder is rewritten (local mode reuses an epoch's
    # folder), then written last. Each file is written whole, so a crash leaves no half-written one.
    storage.remove(directory / META_FILE)
    with storage.atomic_write(directory / STATE_FILE) as handle:
        torch.save(payload, handle)
    progress = {
        "epoch": state.epoch,
        "step_in_epoch": state.step_in_epoch,
        "history": state.history,
        "stopped_early": stopped_early,
    }
    storage.write_text(directory / PROGRESS_FILE, json.dumps(progress, indent=1))
    storage.write_text(directory / META_FILE, json.dumps(meta, indent=1))


def load_checkpoint(
    directory: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: torch.amp.GradScaler | None = None,
    rank: int = 0,
    world_size: int = 1,
    fallback_seed: int | None = None,
    steps_per_epoch: int | None = None,
) -> TrainingState:
    """Restore everything, including this rank's random streams, so the run continues exactly as if never stopped.

    A checkpoint without a stream per rank for this world size (older, or another world size) gives every rank
    rank 0's streams; then torch is re-seeded with `fallback_seed + 1000 * epoch` so ranks differ again (such a
    resume is not bit-identical to a straight run). With `steps_per_epoch`, a checkpoint within an epoch must
    be at one of its steps. Parts that do not load (a damaged or planted file) are a CheckpointError; the
    caller's model and optimiser may then hold some of them, so it restores another checkpoint or stops.
    """
    payload = read_state(directory)
    state = TrainingState.from_saved(payload["training_state"], f"checkpoint {directory}")
    checks.check_step_in_epoch(state.step_in_epoch, steps_per_epoch, f"checkpoint {directory}")
    streams = payload.get("rng_by_rank") or []
    own = isinstance(streams, list) and len(streams) == world_size
    with checks.loading(directory):
        model.load_state_dict(payload["model"])
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and scaler.is_enabled() and payload["scaler"]:
            scaler.load_state_dict(payload["scaler"])
        rng = streams[rank] if own else payload["rng"]
        random.setstate(rng["python"])
        np.random.set_state(_numpy_state_from_tensors(rng["numpy"]))
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            # Only the devices present: a checkpoint from an 8-GPU node resumes on a 1-GPU worker.
            for index, device_state in enumerate(rng["cuda"][: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(device_state, index)
    if not own and fallback_seed is not None:
        torch.manual_seed(fallback_seed + 1000 * state.epoch)
    return state


def restore_newest_sound(latest: str, storage_path: str, restore: Callable[[Path], T]) -> tuple[T, str, str | None]:
    """`restore` applied to the checkpoint `latest` (a location as Ray reports it), or, when that checkpoint is
    damaged (`restore` raises a CheckpointError), to the newest complete checkpoint before it in the same run
    folder that restores. Returns what `restore` returned, the checkpoint it restored and, after a fallback, the
    damaged checkpoint's problem (one line); with none restoring, the latest's CheckpointError is raised.

    Ray hands a worker only its latest registered checkpoint (`ray.train.get_checkpoint`). The others it kept
    (`tracking.keep_checkpoints`) are the folders beside it, named by the time they were written (Ray) or by
    epoch and step (local mode), so a name that sorts before `latest` is an older checkpoint. Ray keeps going
    from its own record; the next report simply adds a newer checkpoint.
    """
    location = checkpoint_uri(latest, storage_path)
    try:
        return _restore_from(location, storage_path, restore), location, None
    except CheckpointError as damage:
        problem = first_line(damage, with_type=False)
        run_dir, _, name = location.rstrip("/").rpartition("/")
        for older in reversed(storage.checkpoint_folders(run_dir)):
            candidate = storage.join(run_dir, older)
            if older < name and storage.is_file(storage.join(candidate, META_FILE)):  # older, and completed
                try:
                    return _restore_from(candidate, storage_path, restore), candidate, problem
                except CheckpointError:
                    continue
        raise


def _restore_from(location: str, storage_path: str, restore: Callable[[Path], T]) -> T:
    with local_checkpoint(location, storage_path) as directory:
        try:
            return restore(directory)
        except PipelineError as error:  # a downloaded copy's problems name the checkpoint it came from
            if str(directory) == location:
                raise
            raise type(error)(str(error).replace(str(directory), location)) from None


def read_state(directory: str | Path) -> dict[str, Any]:
    """The whole saved state (weights, optimiser, training state, RNG) without applying any of it.

    Checkpoint storage is shared and untrusted: `weights_only=True` unpickles tensors, containers, numbers and
    strings only, so a state.pt carrying any other object (a pickle payload) is refused before it can run.
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} is missing (its writing or copying stopped early)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error):  # the weights-only unpickler names the object it refused
            raise CheckpointError(checks.unreadable_state(directory, error)) from None
        raise CheckpointError(
            f"checkpoint {path} refused: it needs full unpickling ({first_line(error, with_type=False)[:120]}), "
            "which can run code; this project saves only tensors and plain values (checkpoints written before that "
            "cannot be resumed or served: "
            "retrain, or convert them where their origin is trusted)"
        ) from None
    except Exception as error:  # whatever the loader makes of these bytes, they are no checkpoint
        raise CheckpointError(checks.unreadable_state(directory, error)) from None
    return checks.state_payload(payload, f"checkpoint {directory}")


def _numpy_state_as_tensors() -> dict[str, Any]:
    # np.random.get_state() holds an ndarray, which weights_only loading refuses; its parts as a tensor and numbers.
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    return (
        state["kind"],
        state["keys"].numpy().astype(np.uint32),
        state["position"],
        state["has_gauss"],
        state["cached_gaussian"],
    )


def load_weights(directory: str | Path, model: torch.nn.Module) -> torch.nn.Module:
    """Only the model weights: for inference, where restoring RNG states would disturb the caller."""
    weights = read_state(directory)["model"]
    with checks.loading(directory):
        model.load_state_dict(weights)
    return model


def read_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint on local storage or object storage (no torch, no download of the weights),
    checked: model, num_classes, and manifest_hash and config where present."""
    return checks.meta(checks.read_json(directory, META_FILE), f"checkpoint {directory}")


def check_compatible(meta: dict[str, Any], model_name: str, num_classes: int, where: str) -> None:
    """A checkpoint of another architecture or class count would silently fail to load; say why instead."""
    if meta["model"] != model_name or meta["num_classes"] != num_classes:
        raise ConfigError(
            f"{where} holds a {meta['model']} checkpoint with {meta['num_classes']} classes, but the config asks "
            f"for {model_name} with {num_classes} classes; choose another tracking.run_name or remove that run"
        )


def latest_run_checkpoint(storage_path: str | Path, run_name: str) -> str | None:
    """The newest complete checkpoint Ray Train left for `run_name`, on any storage: one whose meta.json and
    progress record read (a damaged one is passed over, as a resume passes over it; weights are not read here).

    Ray names checkpoint directories by the time they were written (checkpoint_2026-11-30_05-36-54.789035), so
    the last by name is the newest, on object stores too, which keep no directory times.
    """
    for name in reversed(storage.checkpoint_names(storage_path, run_name)):
        directory = storage.join(storage_path, run_name, name)
        if not storage.is_file(storage.join(directory, META_FILE)):
            continue
        try:
            read_meta(directory), read_progress(directory)
        except CheckpointError:
            continue
        return directory
    return None


@dataclass(frozen=True)
class RunRecord:
    """What a run's checkpoints say it did: every epoch's metrics (from the newest checkpoint) and, per epoch,
    the checkpoint Ray kept for it (older ones are deleted as `tracking.keep_checkpoints` allows)."""

    history: list[dict[str, float]]
    checkpoints: dict[int, str]  # epoch -> checkpoint location
    stopped_early: bool

    @property
    def epochs(self) -> int:
        return len(self.history)

    def finished(self, max_epochs: int) -> bool:
        return self.stopped_early or self.epochs >= max_epochs

    def best_kept(self, metric: str) -> tuple[dict[str, float], str] | None:
        """The best epoch by `metric` that still has its checkpoint (the earliest of equal scores), and that
        checkpoint; None when no kept epoch has the metric."""
        kept = [row for row in self.history if int(row.get(m.EPOCH, 0)) in self.checkpoints and metric in row]
        if not kept:
            return None
        row = max(kept, key=lambda row: (row[metric], -row[m.EPOCH]))
        return row, self.checkpoints[int(row[m.EPOCH])]


def read_run_record(storage_path: str, run_name: str) -> RunRecord | None:
    """The record of `run_name` from its complete checkpoints (those with meta.json), None if it has none.

    Each checkpoint's progress.json is a few kilobytes, so this reads no weights; one without it (written before
    progress.json existed) is read from its state.pt. The files are untrusted: malformed ones are a
    CheckpointError naming the file.
    """
    checkpoints: dict[int, str] = {}
    newest: dict[str, Any] | None = None
    for name in storage.checkpoint_names(storage_path, run_name):
        directory = storage.join(storage_path, run_name, name)
        if not storage.is_file(storage.join(directory, META_FILE)):
            continue  # a checkpoint still being written, or one a crash left half-written
        progress = read_progress(directory)
        if not progress["step_in_epoch"]:  # one taken within an epoch holds no epoch's weights
            checkpoints.setdefault(progress["epoch"], directory)  # a re-reported epoch: its first copy
        if newest is None or progress["epoch"] >= newest["epoch"]:
            newest = progress
    if newest is None:
        return None
    return RunRecord(newest["history"], checkpoints, newest["stopped_early"])


def read_progress(directory: str) -> dict[str, Any]:
    location = storage.join(directory, PROGRESS_FILE)
    if not storage.is_file(location):
        with local_checkpoint(directory, directory) as local:
            state = read_state(local)["training_state"]
        return {
            "epoch": int(state["epoch"]),
            "step_in_epoch": int(state.get("step_in_epoch", 0)),
            "history": list(state["history"]),
            "stopped_early": False,
        }
    try:
        progress = checks.read_json(directory, PROGRESS_FILE)
        epoch, history, stopped = progress["epoch"], progress["history"], progress["stopped_early"]
        step = progress.get("step_in_epoch", 0)  # absent in records written before mid-epoch checkpoints
        valid = (
            checks.is_count(epoch)
            and isinstance(stopped, bool)
            and checks.is_count(step)
            and checks.is_history(history)
        )
    except (CheckpointError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise CheckpointError(
            f"checkpoint {location}: not a progress record (expected epoch, step_in_epoch, "
            "history of per-epoch metrics, stopped_early)"
        )
    return {"epoch": epoch, "step_in_epoch": step, "history": history, "stopped_early": stopped}


def checkpoint_uri(location: str, storage_path: str) -> str:
    """Where Ray put a checkpoint, as a URI: Ray reports paths on a storage URI without the scheme
    ("bucket/run/checkpoint_…" for s3://bucket, "/mnt/x/run/checkpoint_…" for file:///mnt/x)."""
    if storage.is_url(location) or not storage.is_url(storage_path):
        return location
    return f"{urlsplit(storage_path).scheme}://{location}"


@contextmanager
def local_checkpoint(location: str, storage_path: str) -> Iterator[Path]:
    """A checkpoint as a directory on this machine: `location` itself on local storage (disk, NFS); with a
    storage URI (s3://, gs://, file://) fetched through Ray's filesystem layer for the duration of the block
    (a local file:// path is used in place, a remote one downloaded and removed afterwards).
    """
    uri = checkpoint_uri(location, storage_path)
    if not storage.is_url(uri):
        if not Path(uri).is_dir():
            raise StorageError(
                f"checkpoint '{location}': no such directory; was tracking.storage_path "
                f"'{storage_path}' moved or cleaned?"
            )
        yield Path(uri)
        return
    from ray.train import Checkpoint

    with Checkpoint(uri).as_directory() as directory:
        yield Path(directory)
