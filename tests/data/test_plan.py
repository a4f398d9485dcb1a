"""The epoch plan's guarantees over a matrix of world sizes, DataLoader workers and shard layouts."""

from collections import Counter

import pytest

from pipeline.data.plan import plan_eval_worker, plan_train_worker, train_steps_per_epoch

# Shard layouts 1..9 shards with uneven counts (a short last shard, as real sharding leaves).
LAYOUTS = [[9]] + [[7] * (n - 1) + [3] for n in range(2, 10)]
WORLD_SIZES = [1, 2, 3, 4]
LOADER_WORKERS = [0, 1, 2, 3]  # 0 = in-process DataLoader, planned as one worker


def _global_ids(counts, plan):
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [starts[s.shard] + offset for s in plan.segments for offset in range(s.start, s.stop)]


def _rank_plans(counts, world, workers, kind, **kwargs):
    planner = plan_train_worker if kind == "train" else plan_eval_worker
    num = max(1, workers)
    return {
        rank: [planner(counts, world_size=world, rank=rank, worker=w, num_workers=num, **kwargs) for w in range(num)]
        for rank in range(world)
    }


@pytest.mark.parametrize("counts", LAYOUTS, ids=lambda c: f"{len(c)}shards")
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("workers", LOADER_WORKERS)
def test_eval_sees_every_sample_exactly_once_with_equal_steps(counts, world, workers):
    plans = _rank_plans(counts, world, workers, "eval", batch_size=4)
    seen = Counter(i for rank_plans in plans.values() for p in rank_plans for i in _global_ids(counts, p))
    assert sorted(seen) == list(range(sum(counts)))
    assert set(seen.values()) == {1}
    steps = {rank: sum(len(p.batch_sizes) for p in ps) for rank, ps in plans.items()}
    assert len(set(steps.values())) == 1, steps
    for rank_plans in plans.values():
        for p in rank_plans:
            assert sum(p.batch_sizes) == p.num_samples + p.num_padding


@pytest.mark.parametrize("counts", LAYOUTS, ids=lambda c: f"{len(c)}shards")
@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("workers", LOADER_WORKERS)
def test_train_equal_steps_and_at_most_once(counts, world, workers):
    batch = 2
    plans = _rank_plans(counts, world, workers, "train", batch_size=batch, seed=1, epoch=2)
    steps = {rank: sum(len(p.batch_sizes) for p in ps) for rank, ps in plans.items()}
    assert set(steps.values()) == {train_steps_per_epoch(sum(counts), world, batch)}
    ids = [i for ps in plans.values() for p in ps for i in _global_ids(counts, p)]
    assert len(ids) == len(set(ids)), "a sample was planned twice in one epoch"
    assert len(ids) == steps[0] * world * batch
    for ps in plans.values():
        for p in ps:
            assert p.num_samples == sum(p.batch_sizes) and p.num_padding == 0


def _epoch_ids(counts, world, batch, seed, epoch):
    plans = _rank_plans(counts, world, 2, "train", batch_size=batch, seed=seed, epoch=epoch)
    return [i for r in range(world) for p in plans[r] for i in _global_ids(counts, p)]


def test_train_remainder_rotates_so_nothing_is_always_skipped():
    counts = [10, 10, 3]  # 23 samples, global batch 6 -> 5 skipped per epoch
    total = sum(counts)
    skipped_per_epoch = [set(range(total)) - set(_epoch_ids(counts, 2, 3, 0, e)) for e in range(5)]
    assert all(len(s) == 5 for s in skipped_per_epoch)
    # Consecutive epochs skip disjoint windows, and within ceil(23/5) epochs every sample was trained on.
    assert not skipped_per_epoch[0] & skipped_per_epoch[1]
    assert set.intersection(*skipped_per_epoch) == set()
    assert set().union(*[set(_epoch_ids(counts, 2, 3, 0, e)) for e in range(5)]) == set(range(total))


def test_train_shuffle_is_deterministic_per_seed_and_epoch_and_differs_between_epochs():
    counts = [5] * 8
    assert _epoch_ids(counts, 2, 2, 7, 3) == _epoch_ids(counts, 2, 2, 7, 3)
    assert _epoch_ids(counts, 2, 2, 7, 3) != _epoch_ids(counts, 2, 2, 7, 4)
    assert _epoch_ids(counts, 2, 2, 7, 3) != _epoch_ids(counts, 2, 2, 8, 3)


def test_train_reads_whole_shard_runs_not_scattered_samples():
    # Each DataLoader process streams few contiguous segments: at most one more than the shards it spans.
    counts = [100] * 6
    plan = plan_train_worker(counts, world_size=2, rank=1, batch_size=10, seed=0, epoch=0, worker=1, num_workers=2)
    assert len(plan.segments) <= 3


def test_too_few_samples_for_one_global_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        plan_train_worker([3], world_size=2, rank=0, batch_size=2, seed=0, epoch=0)


def test_rank_outside_world_is_rejected():
    with pytest.raises(ValueError, match="outside world size"):
        plan_eval_worker([3], world_size=2, rank=2, batch_size=2)
