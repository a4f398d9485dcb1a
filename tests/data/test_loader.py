"""The real loader (webdataset + DataLoader processes + decoding) keeps the plan's promises."""

import shlex
import sys
from collections import Counter

import pytest
import torch
import webdataset as wds

from pipeline.config import DataConfig
from pipeline.data.loader import IGNORE_LABEL, build_loader
from tests.conftest import jpeg_bytes, write_split

SMALL = dict(train_image_size=16, eval_image_size=16, shuffle_buffer=8, prefetch_batches=1)


def _data(root, workers, **extra):
    return DataConfig(root=root, loader_workers=workers, **SMALL, **extra)


def _run(root, split, world, workers, batch, epoch=0, seed=0):
    """Keys seen and steps taken by every rank, as the ranks of one job would see them."""
    keys: Counter[str] = Counter()
    steps, corrupt = {}, 0
    for rank in range(world):
        loader = build_loader(_data(root, workers), split, rank=rank, world_size=world, batch_size=batch, seed=seed)
        loader.set_epoch(epoch)
        count = 0
        for batch_data in loader:
            count += 1
            assert batch_data.images.dtype == torch.uint8
            assert batch_data.images.shape[1:] == (3, 16, 16)
            keys.update(k for k in batch_data.keys if k)
            corrupt += int(batch_data.corrupt)
        assert count == len(loader)
        steps[rank] = count
    return keys, steps, corrupt


@pytest.mark.parametrize("shard_sizes", [[9], [4, 4, 3, 2], [3] * 8 + [1]], ids=["1shard", "4shards", "9shards"])
@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_eval_pass_reads_every_sample_exactly_once(tmp_path, shard_sizes, world, workers):
    write_split(tmp_path / "val", shard_sizes)
    keys, steps, corrupt = _run(tmp_path, "val", world, workers, batch=2)
    assert sorted(keys) == [f"s{i:06d}" for i in range(sum(shard_sizes))]
    assert set(keys.values()) == {1}
    assert len(set(steps.values())) == 1 and corrupt == 0


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("workers", [0, 3])
def test_train_epoch_equal_steps_at_most_once(tiny_shards, world, workers):
    keys, steps, _ = _run(tiny_shards, "train", world, workers, batch=3)
    assert set(steps.values()) == {53 // (world * 3)}
    assert set(keys.values()) == {1}
    assert sum(keys.values()) == steps[0] * world * 3


@pytest.mark.parametrize("world", [1, 2])
def test_a_refit_reads_train_and_val_as_one_split_under_the_train_plan(tmp_path, world):
    write_split(tmp_path / "train", [12, 12, 5], split="train")
    write_split(tmp_path / "val", [8, 6], split="val", key_prefix="v")
    total, seen = 29 + 14, Counter()
    for epoch in range(2):
        keys, steps, _ = _run(tmp_path, ["train", "val"], world, 2, batch=3, epoch=epoch)
        assert set(steps.values()) == {total // (world * 3)}  # equal steps on every rank, as for train alone
        assert set(keys.values()) == {1} and sum(keys.values()) == steps[0] * world * 3  # at most once per epoch
        assert {key[0] for key in keys} == {"s", "v"}
        seen.update(keys)
    # The skipped window (< one global batch) slides: two epochs reach every sample of both splits.
    assert len(seen) == total


def test_splits_with_different_classes_cannot_be_trained_on_together(tmp_path):
    write_split(tmp_path / "train", [6], split="train")
    write_split(tmp_path / "val", [6], num_classes=3, split="val")
    with pytest.raises(ValueError, match="different classes or sample keys"):
        build_loader(_data(tmp_path, 0), ["train", "val"], rank=0, world_size=1, batch_size=2, seed=0)


def test_train_order_is_deterministic_per_epoch_and_changes_between_epochs(tiny_shards):
    def order(epoch):
        loader = build_loader(_data(tiny_shards, 2), "train", rank=0, world_size=2, batch_size=4, seed=5)
        loader.set_epoch(epoch)
        return [k for b in loader for k in b.keys]

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_labels_match_the_images_they_came_with(tiny_shards):
    # Colour encodes the label in the fixture images; a mix-up between bytes and labels would show.
    loader = build_loader(_data(tiny_shards, 0), "val", rank=0, world_size=1, batch_size=5, seed=0)
    for batch in loader:
        for image, label in zip(batch.images, batch.labels):
            if label >= 0:
                assert abs(image.float().mean().item() - (int(label) * 40) % 256) < 12


def test_corrupt_samples_are_masked_counted_and_keep_step_counts(tmp_path):
    split = tmp_path / "val"
    write_split(split, [6, 6])
    # Replace shard 0 with one holding two undecodable images and one sample without its label.
    with wds.TarWriter(str(split / "val-000000.tar")) as writer:
        for i in range(6):
            sample = {"__key__": f"s{i:06d}", "jpg": jpeg_bytes(i % 4, i), "cls": str(i % 4).encode()}
            if i in (1, 4):
                sample["jpg"] = b"not a jpeg at all"
            if i == 2:
                del sample["cls"]
            writer.write(sample)
    keys, steps, corrupt = _run(tmp_path, "val", 2, 2, batch=2)
    assert corrupt == 3
    assert len(keys) == 12 - 3
    assert len(set(steps.values())) == 1

    # The loader keeps per-shard counts of the pass, from whichever loader process read them.
    loader = build_loader(_data(tmp_path, 2), "val", rank=0, world_size=1, batch_size=2, seed=0)
    for _ in range(2):  # counts are per pass, not cumulative
        assert sum(int(batch.corrupt) for batch in loader) == 3
        assert loader.corrupt_counts.tolist() == [3.0, 0.0]


def test_a_truncated_shard_is_padded_with_masked_samples(tmp_path):
    split = tmp_path / "train"
    write_split(split, [10, 10], split="train")
    data = (split / "train-000001.tar").read_bytes()
    (split / "train-000001.tar").write_bytes(data[: len(data) // 3])
    keys, steps, corrupt = _run(tmp_path, "train", 2, 2, batch=2)
    assert steps == {0: 5, 1: 5}
    assert corrupt >= 5 and len(keys) + corrupt == 20


def test_masked_slots_use_the_ignore_label(tmp_path):
    write_split(tmp_path / "test", [5])  # world 2: rank 0 gets 2 real samples + 1 padding slot
    loader = build_loader(_data(tmp_path, 0), "test", rank=0, world_size=2, batch_size=4, seed=0)
    (batch,) = list(loader)
    assert batch.labels.tolist().count(IGNORE_LABEL) == 1 and int(batch.corrupt) == 0


# ---------------------------------------------------------------------------------------------
# Shards from other places: a URL root (fsspec) and a shard command (webdataset's pipe:) must give
# exactly the batches a local root gives, so where the data lives never changes what is trained on.


def _batches(root, split, workers, **extra):
    """Every batch of both ranks of a 2-worker job, as (keys, labels): order, contents and masking."""
    seen = []
    for rank in range(2):
        loader = build_loader(_data(root, workers, **extra), split, rank=rank, world_size=2, batch_size=3, seed=7)
        loader.set_epoch(1)
        seen.append([(batch.keys, batch.labels.tolist()) for batch in loader])
    return seen


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("workers", [0, 2])  # 2: DataLoader processes are forked and inherit the memory fs
def test_a_url_root_gives_the_same_batches_as_the_local_root(tiny_shards, memory_shards, split, workers):
    local = _batches(tiny_shards, split, workers)
    assert sum(len(rank) for rank in local) > 0
    assert _batches(memory_shards, split, workers) == local
    assert _batches(f"file://{tiny_shards}", split, workers) == local


@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_command_streams_the_same_batches_through_a_pipe(tiny_shards, tmp_path, workers):
    local = _batches(tiny_shards, "train", workers)
    assert _batches(tiny_shards, "train", workers, shard_command="cat {url}") == local
    # The command really is what reads the shards: each shard's path reaches it as one argument, no shell.
    log = tmp_path / "streamed shards.txt"
    script = tmp_path / "stream.py"
    script.write_text(
        "import shutil, sys\n"
        f"open({str(log)!r}, 'a').write(sys.argv[1] + '\\n')\n"
        "shutil.copyfileobj(open(sys.argv[1], 'rb'), sys.stdout.buffer)\n"
    )
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{url}}"
    assert _batches(tiny_shards, "train", workers, shard_command=command) == local
    assert set(log.read_text().split()) == {str(path) for path in (tiny_shards / "train").glob("*.tar")}


def test_a_shard_command_that_fails_masks_its_samples_and_keeps_step_counts(tiny_shards, caplog):
    keys, steps, corrupt = _run_with(tiny_shards, "val", shard_command="false {url}")
    assert not keys and corrupt == 22
    assert steps == {0: 4, 1: 4}  # 22 samples, 2 ranks x batch 3: ceil(11 / 3) steps each
    assert "samples masked" in caplog.text


def test_a_truncated_shard_under_a_url_root_is_masked_like_a_local_one(memory_shards):
    import fsspec

    memory = fsspec.filesystem("memory")
    shard = f"{memory_shards}/val/val-000001.tar"
    memory.pipe_file(shard, memory.cat_file(shard)[:3000])
    keys, steps, corrupt = _run_with(memory_shards, "val")
    assert steps == {0: 4, 1: 4}
    assert corrupt >= 1 and len(keys) + corrupt == 22


def _run_with(root, split, **extra):
    keys, steps, corrupt = set(), {}, 0
    for rank in range(2):
        loader = build_loader(_data(root, 0, **extra), split, rank=rank, world_size=2, batch_size=3, seed=0)
        batches = list(loader)
        steps[rank] = len(batches)
        keys.update(key for batch in batches for key in batch.keys if key)
        corrupt += sum(int(batch.corrupt) for batch in batches)
    return keys, steps, corrupt


def _batches_with(root, split, decode_device=None, **extra):
    loader = build_loader(
        _data(root, 2, **extra), split, rank=0, world_size=1, batch_size=4, seed=5, decode_device=decode_device
    )
    loader.set_epoch(1)
    return list(loader), loader


def _split_with_an_undecodable_jpeg(root, split):
    write_split(root / split, [7, 6], split=split)
    # An undecodable body behind a valid JPEG header: only a full decode finds it, on the device route too.
    with wds.TarWriter(str(root / split / f"{split}-000001.tar")) as writer:
        for i in range(6):
            image = jpeg_bytes(i % 4, 100 + i)
            if i == 3:
                image = image[:200] + bytes(len(image) - 200)
            writer.write({"__key__": f"t{i:06d}", "jpg": image, "cls": str(i % 4).encode()})


def _same_samples_and_masks(cpu, device, cpu_loader, device_loader, device_type):
    assert len(cpu) == len(device)
    for a, b in zip(cpu, device):
        assert (
            a.keys == b.keys and torch.equal(a.labels, b.labels) and tuple(a.corrupt_shards) == tuple(b.corrupt_shards)
        )
        assert b.encoded is None and b.images.device.type == device_type  # decoded by the time the step sees it
    assert device_loader.corrupt_counts.tolist() == cpu_loader.corrupt_counts.tolist()
    assert sum(len(batch.corrupt_shards) for batch in device) == 1


@pytest.mark.parametrize("split", ["train", "val"])
def test_decoding_on_the_device_gives_the_cpu_routes_batches(tmp_path, split):
    """data.decode = gpu run with the decode on the CPU device: the loader processes read bytes and draw the
    crops (the same random stream), the training process decodes. Tolerance: none here — both routes decode
    with libjpeg-turbo and resize with the same uint8 kernel (the CUDA test below measures nvJPEG's)."""
    _split_with_an_undecodable_jpeg(tmp_path, split)
    cpu, cpu_loader = _batches_with(tmp_path, split)
    device, device_loader = _batches_with(tmp_path, split, decode="gpu")
    _same_samples_and_masks(cpu, device, cpu_loader, device_loader, "cpu")
    assert all(torch.equal(a.images, b.images) for a, b in zip(cpu, device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("split", ["train", "val"])
def test_nvjpeg_decoding_gives_the_cpu_routes_crops_within_rounding(tmp_path, split):
    """The same crops, masks and counts as the CPU route; pixels differ only by decoder and resize rounding
    (nvJPEG's IDCT and chroma upsampling, a float resize against libjpeg-turbo and a uint8 one). Measured on an
    H200 (torch 2.11, torchvision 0.26): mean |diff| 0.14 (train) / 0.16 (val), 99th percentile 1, max 2."""
    _split_with_an_undecodable_jpeg(tmp_path, split)
    cpu, cpu_loader = _batches_with(tmp_path, split)
    device, device_loader = _batches_with(tmp_path, split, decode_device=torch.device("cuda"), decode="gpu")
    _same_samples_and_masks(cpu, device, cpu_loader, device_loader, "cuda")
    difference = torch.cat([(a.images.int() - b.images.cpu().int()).abs().flatten() for a, b in zip(cpu, device)])
    print(
        f"nvJPEG vs CPU route ({split}): mean |diff| {difference.float().mean():.3f}, "
        f"99th percentile {difference.float().quantile(0.99):.0f}, max {difference.max()}"
    )
    assert difference.float().mean() <= 0.5 and difference.max() <= 4


@pytest.mark.parametrize(("workers", "start"), [(0, 5), (2, 3), (3, 4), (3, 8)])
def test_a_pass_started_mid_epoch_yields_exactly_the_rest_of_the_full_pass(tiny_shards, workers, start):
    """A resume at step k (pipeline.train.step) sees batches k, k+1, ... of the uninterrupted pass: same samples,
    same order, same augmented pixels, whatever the number of loader processes."""

    def batches(start_step):
        loader = build_loader(_data(tiny_shards, workers), "train", rank=1, world_size=2, batch_size=2, seed=3)
        loader.set_epoch(1, start_step=start_step)
        return [(batch.keys, batch.images) for batch in loader]

    full, rest = batches(0), batches(start)
    assert len(full) == 13 and len(rest) == 13 - start
    assert [keys for keys, _ in rest] == [keys for keys, _ in full[start:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(rest, full[start:]))


def test_a_pass_started_past_its_last_step_is_one_line_naming_the_step(tiny_shards):
    from pipeline.errors import DataError

    loader = build_loader(_data(tiny_shards, 2), "train", rank=1, world_size=2, batch_size=2, seed=3)
    with pytest.raises(DataError, match=r"start_step = 13: this pass has only 13 steps per rank") as caught:
        loader.set_epoch(1, start_step=13)
    assert "\n" not in str(caught.value)
    loader.set_epoch(1, start_step=12)  # the last step: one batch left
    assert len(list(loader)) == 1


def test_a_resumed_pass_joins_nearby_wanted_samples_into_one_ranged_read():
    """After a resume the wanted samples are scattered (what the shuffle had not yet given); reads closer than
    MAX_GAP_BYTES become one request, the samples between them dropped by the caller."""
    import numpy as np

    from pipeline.data.shard_reader import MAX_GAP_BYTES, _coalesced

    sizes = np.array([1000] * 6 + [MAX_GAP_BYTES] * 2 + [1000] * 2, dtype=np.uint64)
    index = np.stack([np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes], axis=1)
    # Samples 0, 2-3 and 5 are 1-2 kB apart: one read; 8 sits 2 MiB past 5 (samples 6 and 7): its own read.
    assert _coalesced([(0, 1), (2, 4), (5, 6), (8, 9)], index) == [(0, 6), (8, 9)]
    assert _coalesced([], index) == []


# ---------------------------------------------------------------------------------------------
# Issue 23, decompression bombs: a sample declaring more than data.max_image_pixels is refused from its header
# and masked as a corrupt sample on both decode routes, never decoded (in-process loaders, so the spies see all).


def _split_with_bombs(root, split):
    from tests.data.test_image_header import bomb_jpeg, bomb_png

    write_split(root / split, [5, 5], split=split)
    with wds.TarWriter(str(root / split / f"{split}-000001.tar")) as writer:
        for i in range(5):
            image = {1: bomb_png(), 3: bomb_jpeg()}.get(i) or jpeg_bytes(i % 4, 200 + i)
            writer.write({"__key__": f"b{i:06d}", "jpg": image, "cls": str(i % 4).encode()})


def _refuse_large_decodes(monkeypatch):
    """Every decode (PIL's, torchvision's) fails the test before it starts when the image is over 1 MP."""
    from PIL import ImageFile

    from pipeline.data import transforms
    from pipeline.data.image_header import declared_size

    def small(size):
        assert size is not None and size[0] * size[1] < 1_000_000, f"a {size} image was decoded"

    real_load, real_decode = ImageFile.ImageFile.load, transforms.decode_jpeg
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: small(image.size) or real_load(image))

    def decode(data, **keywords):
        for jpeg in data if isinstance(data, list) else [data]:
            small(declared_size(memoryview(jpeg.numpy())))
        return real_decode(data, **keywords)

    monkeypatch.setattr(transforms, "decode_jpeg", decode)


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_decompression_bombs_are_masked_as_corrupt_samples_without_being_decoded(tmp_path, monkeypatch, split, decode):
    _split_with_bombs(tmp_path, split)
    _refuse_large_decodes(monkeypatch)
    # Batches of 5: a train epoch of 10 samples then takes them all (it drops a remainder to keep steps equal).
    loader = build_loader(_data(tmp_path, 0, decode=decode), split, rank=0, world_size=1, batch_size=5, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 2  # step counts as planned
    assert sum(batch.corrupt for batch in batches) == 2 and loader.corrupt_counts.tolist() == [0.0, 2.0]
    keys = {key for batch in batches for key in batch.keys if key}
    assert len(keys) == 8 and not keys & {"b000001", "b000003"}


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_max_image_pixels_flows_from_the_config_to_the_decoders(tiny_shards, decode):
    # The fixture's images are 40 x 30 = 1200 pixels: a limit of 1200 admits all 22 val samples, 1199 none.
    for limit, corrupt in ((1200, 0), (1199, 22)):
        data = _data(tiny_shards, 0, decode=decode, max_image_pixels=limit)
        loader = build_loader(data, "val", rank=0, world_size=1, batch_size=4, seed=0)
        assert sum(batch.corrupt for batch in loader) == corrupt
