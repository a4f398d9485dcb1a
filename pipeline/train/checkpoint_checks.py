"""What a checkpoint's files must hold to be used: each check names the checkpoint and the problem in one line.

Checkpoint storage is shared and outlives the processes that write it: a crash, a full disk or an interrupted
copy leaves a truncated or missing file, and anyone who can write there can plant one. So everything read back
is checked before any of it is applied, and every damaged form is one CheckpointError (never a traceback):
state.pt missing, truncated or not a torch file, or without the parts a checkpoint holds; meta.json or
progress.json missing, not JSON, larger than any this project writes, or with fields of the wrong kind; a
training state whose counts are negative, disagree with each other, or point past the end of an epoch.
`pipeline.train.checkpoints` reads through these; a resume then falls back to an older checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline import storage
from pipeline.errors import CheckpointError, first_line

STATE_FILE = "state.pt"
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
# meta.json holds the resolved config (a few KiB), progress.json a row of metrics per epoch: a file past this
# was not written by this project, and is refused without being read whole.
JSON_LIMIT = 16 << 20
_STATE_PARTS = ("model", "optimizer", "scheduler", "training_state", "rng")


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_history(value: Any) -> bool:
    """One dict of metric name -> number per epoch."""
    return isinstance(value, list) and all(
        isinstance(row, dict) and all(isinstance(key, str) and is_number(number) for key, number in row.items())
        for row in value
    )


def read_json(directory: str | Path, name: str) -> Any:
    """A checkpoint's JSON file, parsed; missing, oversized or not JSON is a CheckpointError."""
    location = storage.join(directory, name)
    if not storage.is_file(location):
        raise CheckpointError(f"checkpoint {directory}: {name} is missing")
    if storage.size(location) > JSON_LIMIT:
        raise CheckpointError(
            f"checkpoint {directory}: {name} is larger than {JSON_LIMIT >> 20} MiB, more than this project writes"
        )
    data = storage.read_bytes(location, limit=JSON_LIMIT)  # bounded again: shared storage can change between
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, nesting past the stack
        raise CheckpointError(f"checkpoint {directory}: {name} is not JSON ({first_line(error)})") from None


def meta(value: Any, where: str) -> dict[str, Any]:
    """meta.json's content: model (a name) and num_classes (>= 1); manifest_hash (text) and config (an object)
    where present (checkpoints of hand-made tools may lack them)."""
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: {META_FILE} holds a JSON {type(value).__name__}, not an object")
    fields = {
        "model": (lambda v: isinstance(v, str) and bool(v), "a model name"),
        "num_classes": (lambda v: is_count(v) and v >= 1, "a class count >= 1"),
        "manifest_hash": (lambda v: isinstance(v, str), "text"),
        "config": (lambda v: isinstance(v, dict), "an object"),
    }
    for key, (valid, allowed) in fields.items():
        if key in ("model", "num_classes") and key not in value:
            raise CheckpointError(f"{where}: {META_FILE} has no '{key}'")
        if key in value and not valid(value[key]):
            raise CheckpointError(f"{where}: {META_FILE} has {key} = {_shown(value[key])}, not {allowed}")
    return value


def unreadable_state(directory: str | Path, error: BaseException) -> str:
    return (
        f"checkpoint {directory}: {STATE_FILE} is truncated or damaged, not a readable torch checkpoint "
        f"({first_line(error)[:120]})"
    )


def state_payload(payload: Any, where: str) -> dict[str, Any]:
    """state.pt's content as `save_checkpoint` writes it: the model's tensors and each part a resume applies."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"{where}: {STATE_FILE} holds a {type(payload).__name__}, not a checkpoint's state")
    missing = [part for part in _STATE_PARTS if not isinstance(payload.get(part), dict)]
    if missing:
        raise CheckpointError(f"{where}: {STATE_FILE} has no {', '.join(missing)} (each a mapping)")
    if not all(isinstance(tensor, torch.Tensor) for tensor in payload["model"].values()):
        raise CheckpointError(f"{where}: {STATE_FILE}'s model weights are not all tensors")
    return payload


def training_state(saved: Any, where: str) -> dict[str, Any]:
    """The saved `TrainingState` fields, each checked (fields a checkpoint predates take their defaults)."""
    fields = {
        "epoch": (is_count, "a count >= 0"),
        "global_step": (is_count, "a count >= 0"),
        "history": (is_history, "a list of per-epoch metrics"),
        "best_metric": (lambda v: v is None or is_number(v), "a number or null"),
        "epochs_without_improvement": (is_count, "a count >= 0"),
        "step_in_epoch": (is_count, "a count >= 0"),
        "partial_epoch": (
            lambda v: isinstance(v, list) and len(v) in (0, 3) and all(map(is_number, v)),
            "3 numbers (loss sum, valid and corrupt samples) or none",
        ),
    }
    unknown = sorted(map(str, set(saved) - set(fields))) if isinstance(saved, dict) else []
    if not isinstance(saved, dict) or unknown or not {"epoch", "global_step", "history"} <= set(saved):
        extra = f"; has {', '.join(unknown)}" if unknown else ""
        raise CheckpointError(
            f"{where}: {STATE_FILE}'s training state is not one this project saves (needs "
            f"epoch, global_step, history{extra})"
        )
    for key, (valid, allowed) in fields.items():
        if key in saved and not valid(saved[key]):
            raise CheckpointError(
                f"{where}: {STATE_FILE}'s training state has {key} = {_shown(saved[key])}, not {allowed}"
            )
    if saved.get("step_in_epoch", 0) > saved["global_step"]:
        raise CheckpointError(
            f"{where}: {STATE_FILE}'s training state has step_in_epoch = "
            f"{saved['step_in_epoch']}, past global_step = {saved['global_step']}"
        )
    return saved


def check_step_in_epoch(step_in_epoch: int, steps_per_epoch: int | None, where: str) -> None:
    """A checkpoint within an epoch resumes at its next step, which this run's epoch must have."""
    if steps_per_epoch is not None and step_in_epoch >= steps_per_epoch:
        raise CheckpointError(
            f"{where}: taken at step {step_in_epoch} of an epoch, but this run's epochs have {steps_per_epoch} steps"
        )


@contextmanager
def loading(directory: str | Path) -> Iterator[None]:
    """Applying a state.pt's parts (weights, optimiser, schedule, random streams): one that does not fit is a
    CheckpointError naming the checkpoint, not torch's or random's multi-line error."""
    try:
        yield
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"checkpoint {directory}: {STATE_FILE} does not load into this run ({first_line(error)[:160]})"
        ) from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
