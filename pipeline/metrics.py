"""Metric names, defined once: Ray Train reports, checkpoint scoring, Ray Tune and MLflow all use these.

MLflow accepts '/' in metric names and groups them in its UI, so `val/top1` shows under `val`.
"""

from __future__ import annotations

import torch

EPOCH = "epoch"
# In a checkpoint report taken within an epoch (tracking.checkpoint_every_steps): the steps of the epoch after
# `epoch` done so far. Epoch-end reports never carry it.
STEP_IN_EPOCH = "step_in_epoch"
TRAIN_LOSS = "train/loss"
TRAIN_LR = "train/lr"
TRAIN_IMAGES_PER_SECOND = "train/images_per_second"
TRAIN_DATA_WAIT_SHARE = "train/data_wait_share"  # share of step time spent waiting for the loader
TRAIN_CORRUPT_SAMPLES = "train/corrupt_samples"
# Within an epoch, every tracking.log_every_n_steps optimizer steps (MLflow step = global step, not epoch).
STEP_LOSS = "train_step/loss"  # mean over the window, rank 0's share of each global batch
STEP_LR = "train_step/lr"
STEP_IMAGES_PER_SECOND = "train_step/images_per_second"  # whole job: global batch images over the window
VAL_LOSS = "val/loss"
VAL_TOP1 = "val/top1"  # percent, exact: counts summed over all ranks
VAL_TOP5 = "val/top5"
VAL_CORRUPT_SAMPLES = "val/corrupt_samples"
TEST_TOP1 = "test/top1"
TEST_TOP5 = "test/top5"
TEST_TOP5_ERROR = "test/top5_error"
# Learned-feature quality (pipeline.features.quality), percent: k-NN top-1 with the train split as gallery;
# recall@k and mAP@R leave-one-out within the test split. MLflow metric names cannot hold '@'.
VAL_KNN_TOP1 = "val/knn_top1"
TEST_KNN_TOP1 = "test/knn_top1"
TEST_RECALL_AT = "test/recall_at_{k}"
TEST_MAP_AT_R = "test/map_at_r"

# On the run that logged a registered version: the score its champion decision was made on (its best val/top1,
# or for a refit its sweep's). The gate reads the champion's from here, a metric, never from a free-text tag.
GATE_SCORE = "registry/gate_score"

# Model selection: checkpoints, early stopping, ASHA and the champion gate all maximise this.
SELECTION_METRIC = VAL_TOP1
SELECTION_MODE = "max"


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Correct predictions for each k, as a tensor on the logits' device (summing there keeps an evaluation pass
    free of a device wait per batch). Masked slots (labels < 0) never equal a class index, so they count as no
    hit without being filtered out: a boolean index would make the device report its result size."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(labels.unsqueeze(1))
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks])
