"""`imagenet-pipeline load`'s check: stream a split as every rank would, and report whether the plan's promises
held (equal steps on every rank; eval reads each sample exactly once, train at most once per epoch)."""

import pytest
import webdataset as wds

from pipeline.config import load_config
from pipeline.data.loadcheck import LoadReport, check_loading
from pipeline.errors import DataError
from tests.conftest import jpeg_bytes, write_split


def config(root, *overrides):
    return load_config(
        overrides=[
            f"data.root={root}",
            "data.train_image_size=16",
            "data.eval_image_size=16",
            "data.loader_workers=0",
            "data.shuffle_buffer=8",
            "scaling.num_workers=2",
            "optim.batch_size=4",  # global: 2 per rank
            *overrides,
        ]
    )


def test_an_eval_split_is_read_exactly_once_across_the_ranks(tiny_shards):
    report = check_loading(config(tiny_shards), "val")
    assert (report.split, report.world_size, report.per_rank_batch, report.num_samples) == ("val", 2, 2, 22)
    assert report.steps_per_rank == {0: [6], 1: [6]}  # 22 samples, 11 a rank, 2 a batch: the last step padded
    assert report.samples_per_epoch == [22] and report.images == 22
    assert report.duplicates == 0 and report.corrupt == 0
    assert report.ok
    summary = report.summary()
    assert summary.startswith("val: 22 samples, world 2 x batch 2; steps per epoch rank 0: [6], rank 1: [6]; ")
    assert summary.endswith("equal steps on every rank: yes; each sample exactly once: yes")


def test_train_epochs_take_equal_steps_and_no_sample_twice(tiny_shards):
    report = check_loading(config(tiny_shards, "scaling.num_workers=3", "optim.batch_size=9"), "train", epochs=2)
    # 53 samples, 3 ranks of 3: 5 full steps a rank; the rest (< one global batch) waits for a later epoch.
    assert report.steps_per_rank == {0: [5, 5], 1: [5, 5], 2: [5, 5]}
    assert report.samples_per_epoch == [45, 45] and report.images == 90
    assert report.duplicates == 0 and report.ok
    assert report.summary().endswith("each sample at most once: yes")


def test_corrupt_samples_count_towards_reading_every_sample_once(tmp_path):
    write_split(tmp_path / "val", [6, 6])
    with wds.TarWriter(str(tmp_path / "val" / "val-000000.tar")) as writer:  # two of shard 0's images undecodable
        for index in range(6):
            image = b"not a jpeg at all" if index in (1, 4) else jpeg_bytes(index % 4, index)
            writer.write({"__key__": f"s{index:06d}", "jpg": image, "cls": str(index % 4).encode()})
    report = check_loading(config(tmp_path), "val")
    assert report.corrupt == 2 and report.samples_per_epoch == [10] and report.images == 10
    assert report.exactly_once and report.ok


def test_a_split_that_is_not_one_of_the_three_is_refused():
    with pytest.raises(DataError, match=r"^split 'training' is not one of train, val, test$"):
        check_loading(load_config(), "training")


@pytest.mark.parametrize(
    ("changes", "equal_steps", "exactly_once"),
    [
        ({}, True, True),
        ({"steps_per_rank": {0: [3], 1: [2]}}, False, True),  # one rank would wait forever at its last step
        ({"duplicates": 1}, True, False),
        ({"samples_per_epoch": [9]}, True, False),  # eval: a sample never read
        ({"samples_per_epoch": [9], "corrupt": 1}, True, True),  # ... or read and masked as corrupt
    ],
)
def test_the_verdict_says_which_promise_broke(changes, equal_steps, exactly_once):
    report = LoadReport("val", 2, 2, 10, steps_per_rank={0: [3], 1: [3]}, samples_per_epoch=[10])
    for key, value in changes.items():
        setattr(report, key, value)
    assert (report.equal_steps, report.exactly_once, report.ok) == (
        equal_steps,
        exactly_once,
        equal_steps and exactly_once,
    )
    last = report.summary().splitlines()[-1]
    assert last == (
        f"equal steps on every rank: {'yes' if equal_steps else 'NO'}; "
        f"each sample exactly once: {'yes' if exactly_once else 'NO'}"
    )


def test_a_train_epoch_need_not_read_every_sample():
    report = LoadReport("train", 2, 2, 10, steps_per_rank={0: [2], 1: [2]}, samples_per_epoch=[8])
    assert report.exactly_once and report.ok
    report.duplicates = 1
    assert not report.ok
