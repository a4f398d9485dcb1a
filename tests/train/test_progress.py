"""Rank-aware output: lines carry their rank, only rank 0 speaks unless asked, and the epoch table lines up."""

import uuid

from pipeline import metrics as m
from pipeline.train.progress import EpochTable, RankLogger


def logger(rank: int) -> RankLogger:
    # A logger per name is process-wide: a fresh name binds this test's captured stdout.
    return RankLogger(rank, name=f"tests-progress-{uuid.uuid4().hex}")


def test_only_rank_0_logs_info_unless_every_rank_is_asked(capsys):
    first, second = logger(0), logger(1)
    first.info("epoch 1 done")
    second.info("epoch 1 done")
    second.info("rank 1 read 12 shards", all_ranks=True)
    assert capsys.readouterr().out.splitlines() == ["[rank 0] epoch 1 done", "[rank 1] rank 1 read 12 shards"]


def test_warnings_come_from_every_rank(capsys):
    logger(0).warning("skipped a damaged checkpoint")
    logger(3).warning("skipped a damaged checkpoint")
    assert capsys.readouterr().out.splitlines() == [
        "[rank 0] skipped a damaged checkpoint",
        "[rank 3] skipped a damaged checkpoint",
    ]


def test_the_epoch_table_prints_its_header_once_and_aligns_each_column_under_it(capsys):
    table = EpochTable(logger(0))
    table.row(
        {
            m.EPOCH: 3,
            m.TRAIN_LOSS: 1.23456,
            m.VAL_LOSS: 0.9,
            m.VAL_TOP1: 61.234,
            m.VAL_TOP5: 88.0,
            m.TRAIN_LR: 0.0125,
            m.TRAIN_IMAGES_PER_SECOND: 812.34,
            m.TRAIN_DATA_WAIT_SHARE: 0.12,
            m.VAL_KNN_TOP1: 40.0,  # not a column: left out
        }
    )
    table.row({m.EPOCH: 4, m.TRAIN_LOSS: 1.0})  # a refit has no val split: its columns say nan
    lines = [line.removeprefix("[rank 0] ") for line in capsys.readouterr().out.splitlines()]
    assert lines[:2] == [
        "epoch  train loss  val loss  top-1 %  top-5 %         lr  images/s  data wait",
        "    3      1.2346    0.9000    61.23    88.00   1.25e-02     812.3        12%",
    ]
    assert len(lines) == 3 and lines[2].split()[:2] == ["4", "1.0000"]
    assert all(field.startswith("nan") for field in lines[2].split()[2:])
    assert len({len(line) for line in lines}) == 1


def test_the_epoch_table_is_silent_on_other_ranks(capsys):
    EpochTable(logger(1)).row({m.EPOCH: 1, m.TRAIN_LOSS: 2.0})
    assert capsys.readouterr().out == ""
