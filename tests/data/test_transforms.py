"""Behaviour of the decode + augment transforms and of on-device normalisation."""

from __future__ import annotations

import io
import random
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, WebPImagePlugin
from torchvision import transforms as tv_transforms
from torchvision.transforms import functional as tv_functional

from pipeline.data import transforms
from pipeline.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    EncodedImage,
    EvalTransform,
    TrainTransform,
    choose_draft_scale,
    decode_on_device,
    normalize_batch,
    prepare_for_device,
    sample_crop,
)
from tests.data.test_image_header import bomb_jpeg, bomb_png, saved

# torchvision 0.29 deprecates its image decoders (in favour of TorchCodec) on every call; pipeline.data.transforms
# documents why it still uses decode_jpeg.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def encode(pixels: np.ndarray, format: str = "JPEG", mode: str | None = None, quality: int = 95) -> bytes:
    """Encode an (H, W, 3) uint8 array, optionally converted to `mode` ("L", "CMYK", "RGBA", "P") first."""
    image = Image.fromarray(pixels, "RGB")
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=format, **({"quality": quality} if format == "JPEG" else {}))
    return buffer.getvalue()


def smooth_picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth random colour field with mild grain: photo-like enough for resampling comparisons."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse, "RGB").resize((width, height), Image.BICUBIC), np.int16)
    return np.clip(smooth + rng.integers(-6, 7, smooth.shape), 0, 255).astype(np.uint8)


def as_array(image_chw: torch.Tensor) -> np.ndarray:
    return image_chw.permute(1, 2, 0).numpy().astype(np.int16)


def mean_abs_difference(first: np.ndarray, second: np.ndarray) -> float:
    return float(np.abs(first.astype(np.int16) - second.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def photo_jpeg() -> bytes:
    return encode(smooth_picture(320, 240))


@pytest.fixture(scope="module")
def large_photo_jpeg() -> bytes:
    return encode(smooth_picture(1600, 1200, seed=1), quality=90)


def test_train_output_is_contiguous_uint8_chw_of_the_requested_size(photo_jpeg):
    for size in (1, 32, 224, 400):  # 400 > 320 x 240: the crop is upsampled
        image = TrainTransform(size)(photo_jpeg, random.Random(0))
        assert image.shape == (3, size, size)
        assert image.dtype == torch.uint8
        assert image.is_contiguous()


def test_train_is_deterministic_for_a_seed_and_varies_across_seeds(photo_jpeg):
    transform = TrainTransform(64)
    assert torch.equal(transform(photo_jpeg, random.Random(7)), transform(photo_jpeg, random.Random(7)))
    outputs = [transform(photo_jpeg, random.Random(seed)) for seed in range(6)]
    distinct = {output.numpy().tobytes() for output in outputs}
    assert len(distinct) == 6


def test_train_matches_torchvision_random_resized_crop_on_the_same_box(photo_jpeg):
    original = Image.open(io.BytesIO(photo_jpeg)).convert("RGB")
    for seed in range(8):
        ours = TrainTransform(128)(photo_jpeg, random.Random(seed))
        rng = random.Random(seed)
        top, left, height, width = sample_crop(*original.size, rng)
        reference = tv_functional.resized_crop(
            original, top, left, height, width, [128, 128], interpolation=tv_transforms.InterpolationMode.BILINEAR
        )
        if rng.random() < 0.5:
            reference = tv_functional.hflip(reference)
        # Full-size decode (a 240 px high image has no crop of 2 x 128): torch's uint8 antialiased resize is
        # within one grey level of PIL's, pixel by pixel.
        assert np.abs(as_array(ours) - np.asarray(reference)).max() <= 1


def test_flip_mirrors_the_image_half_of_the_time():
    # Left half red, right half blue. With min_scale=1 on a square image every sampled box overflows, so the
    # fallback crop is the whole image and only the flip varies.
    pixels = np.zeros((120, 120, 3), np.uint8)
    pixels[:, :60, 0] = 255
    pixels[:, 60:, 2] = 255
    transform = TrainTransform(40, min_scale=1.0)
    outputs = [transform(encode(pixels, "PNG"), random.Random(seed)) for seed in range(40)]
    plain = [output for output in outputs if output[0, 20, 5] > 200]  # red on the left
    mirrored = [output for output in outputs if output[2, 20, 5] > 200]  # blue on the left
    assert len(plain) + len(mirrored) == 40
    assert 8 <= len(mirrored) <= 32
    assert torch.equal(mirrored[0], plain[0].flip(-1))


def test_sample_crop_stays_inside_the_image_with_the_allowed_area_and_aspect():
    rng = random.Random(0)
    for _ in range(500):
        top, left, height, width = sample_crop(500, 375, rng, min_scale=0.25)
        assert 0 <= top and top + height <= 375 and 0 <= left and left + width <= 500
        assert 0.25 * 0.95 <= height * width / (500 * 375) <= 1.0
        assert 3 / 4 * 0.95 <= width / height <= 4 / 3 * 1.05


def test_sample_crop_falls_back_to_a_centred_box_in_the_aspect_range():
    # A 1000 x 10 strip: no box of the allowed aspect covers 8% of it, so every try fails.
    assert sample_crop(1000, 10, random.Random(0)) == (0, (1000 - 13) // 2, 10, 13)


def test_choose_draft_scale_keeps_the_region_at_least_the_output_size():
    assert choose_draft_scale(500, 375, 224, 224) == 1
    assert choose_draft_scale(448, 448, 224, 224) == 2
    assert choose_draft_scale(1000, 1000, 224, 224) == 4
    assert choose_draft_scale(2000, 1800, 224, 224) == 8
    assert choose_draft_scale(300, 260, 128, 128) == 2


def test_reduced_size_decode_is_used_for_large_crops_and_stays_close_to_a_full_decode(large_photo_jpeg, monkeypatch):
    full_size_calls = []
    decode_full_size = transforms._decode_full_size
    monkeypatch.setattr(
        transforms, "_decode_full_size", lambda *arguments: full_size_calls.append(1) or decode_full_size(*arguments)
    )
    # Crops of at least half of 1600 x 1200 are >= 848 px a side: decoded at 1/4 or 1/8 for 128 px.
    train = TrainTransform(128, min_scale=0.5)
    evaluate = EvalTransform(64)  # shorter side 1200 -> 73: decoded at 1/8
    drafted = [train(large_photo_jpeg, random.Random(seed)) for seed in range(4)] + [evaluate(large_photo_jpeg)]
    assert full_size_calls == []

    monkeypatch.setattr(transforms, "DRAFT_SCALES", ())
    full = [train(large_photo_jpeg, random.Random(seed)) for seed in range(4)] + [evaluate(large_photo_jpeg)]
    assert len(full_size_calls) == 5
    for reduced_output, full_output in zip(drafted, full):
        assert reduced_output.shape == full_output.shape
        assert mean_abs_difference(as_array(reduced_output), as_array(full_output)) < 2.0


def test_eval_is_deterministic_and_takes_the_centre():
    # A white 100 x 100 square at the exact centre of a black 300 x 200 image. With crop_ratio 0.5 the shorter
    # side is resized to 200 (unchanged) and the 100 px centre crop is exactly the square.
    pixels = np.zeros((200, 300, 3), np.uint8)
    pixels[50:150, 100:200] = 255
    transform = EvalTransform(100, crop_ratio=0.5)
    output = transform(encode(pixels, "PNG"))
    assert torch.equal(output, torch.full((3, 100, 100), 255, dtype=torch.uint8))
    jpeg_output = transform(encode(pixels), random.Random(3))
    assert torch.equal(jpeg_output, transform(encode(pixels), random.Random(4)))  # rng is ignored
    assert jpeg_output.float().mean() > 245


def test_eval_matches_torchvision_resize_and_centre_crop(photo_jpeg):
    original = Image.open(io.BytesIO(photo_jpeg)).convert("RGB")
    for size, crop_ratio in ((224, 0.875), (150, 0.875), (200, 1.0)):  # all decoded at full size
        ours = EvalTransform(size, crop_ratio)(photo_jpeg)
        reference = tv_transforms.Compose(
            [tv_transforms.Resize(round(size / crop_ratio)), tv_transforms.CenterCrop(size)]
        )(original)
        assert ours.shape == (3, size, size) and ours.is_contiguous()
        assert np.abs(as_array(ours) - np.asarray(reference)).max() <= 1


@pytest.mark.parametrize(
    "format, mode", [("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "L"), ("WEBP", None)]
)
def test_other_colour_modes_and_formats_come_out_rgb(format, mode):
    data = encode(smooth_picture(160, 120), format, mode)
    train_output = TrainTransform(48)(data, random.Random(0))
    assert train_output.shape == (3, 48, 48) and train_output.dtype == torch.uint8
    eval_output = EvalTransform(48, crop_ratio=1.0)(data)
    expected = tv_transforms.Compose([tv_transforms.Resize(48), tv_transforms.CenterCrop(48)])(
        Image.open(io.BytesIO(data)).convert("RGB")
    )
    assert mean_abs_difference(as_array(eval_output), np.asarray(expected)) < 1.0


def test_large_grey_and_cmyk_jpegs_come_out_rgb_through_the_reduced_decode():
    for mode in ("L", "CMYK"):
        data = encode(smooth_picture(800, 600), "JPEG", mode)
        output = EvalTransform(64, crop_ratio=1.0)(data)  # shorter side 600 -> 64: decoded at 1/8
        expected = tv_transforms.Compose([tv_transforms.Resize(64), tv_transforms.CenterCrop(64)])(
            Image.open(io.BytesIO(data)).convert("RGB")
        )
        assert output.shape == (3, 64, 64)
        assert mean_abs_difference(as_array(output), np.asarray(expected)) < 2.0


@pytest.mark.parametrize("data", [b"", b"not an image at all" * 20, b"\xff\xd8\xff\xe0" + b"\x00" * 64])
def test_garbage_bytes_raise_corrupt_image_error(data):
    with pytest.raises(CorruptImageError):
        TrainTransform(32)(data, random.Random(0))
    with pytest.raises(CorruptImageError):
        EvalTransform(32)(data)


def test_truncated_jpeg_raises_corrupt_image_error_on_both_decode_paths(large_photo_jpeg):
    truncated = large_photo_jpeg[: len(large_photo_jpeg) // 3]
    with pytest.raises(CorruptImageError):
        TrainTransform(224)(truncated, random.Random(0))  # full-size decode (torchvision)
    with pytest.raises(CorruptImageError):
        EvalTransform(32)(truncated)  # reduced-size decode (PIL draft)
    assert issubclass(CorruptImageError, ValueError)


def test_normalize_batch_matches_torchvision_to_tensor_and_normalize():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(3)]
    reference_transform = tv_transforms.Compose(
        [tv_transforms.ToTensor(), tv_transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    reference = torch.stack([reference_transform(Image.fromarray(image)) for image in images])
    batch = torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images])
    normalised = normalize_batch(batch, "cpu")
    assert normalised.dtype == torch.float32 and normalised.device.type == "cpu"
    torch.testing.assert_close(normalised, reference, atol=1e-5, rtol=0)
    assert torch.equal(batch, torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images]))

    channels_last = normalize_batch(batch, torch.device("cpu"), channels_last=True)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, reference, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_batch_runs_on_the_gpu():
    batch = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8).pin_memory()
    normalised = normalize_batch(batch, "cuda", channels_last=True)
    assert normalised.device.type == "cuda"
    torch.testing.assert_close(normalised.cpu(), normalize_batch(batch, "cpu"), atol=1e-5, rtol=0)


def test_normalize_batch_rejects_anything_but_uint8_nchw():
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(torch.zeros(2, 3, 4, 4), "cpu")
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(torch.zeros(3, 4, 4, dtype=torch.uint8), "cpu")


@pytest.mark.parametrize(
    "build, name",
    [
        (lambda: TrainTransform(0), "image_size"),
        (lambda: TrainTransform(22.5), "image_size"),
        (lambda: TrainTransform(224, min_scale=0.0), "min_scale"),
        (lambda: TrainTransform(224, min_scale=1.5), "min_scale"),
        (lambda: EvalTransform(-1), "image_size"),
        (lambda: EvalTransform(224, crop_ratio=0.0), "crop_ratio"),
        (lambda: EvalTransform(224, crop_ratio=1.2), "crop_ratio"),
        (lambda: TrainTransform(224, max_image_pixels=0), "max_image_pixels"),
        (lambda: EvalTransform(224, max_image_pixels=1.5e7), "max_image_pixels"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_argument(build, name):
    with pytest.raises(ValueError, match=name):
        build()


# ---------------------------------------------------------------------------------------------
# Decompression bombs (issue 23): an image's declared size is read from its header and refused above
# max_image_pixels before anything is decoded, on the CPU route and the device route alike (the hostile images
# and the header reading itself: tests/data/test_image_header.py).


@pytest.fixture
def nothing_is_decoded(monkeypatch):
    """Fails the test if any pixel is decoded (PIL's loaders, torchvision's decode_jpeg) or PIL warns."""

    def decoded(*arguments, **keywords):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load", decoded)
    monkeypatch.setattr(transforms, "decode_jpeg", decoded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning included
        yield


@pytest.mark.parametrize("bomb", [bomb_png, bomb_jpeg], ids=["png", "jpeg"])
def test_a_decompression_bomb_is_refused_from_its_header_by_both_transforms(bomb, nothing_is_decoded):
    data = bomb()
    assert len(data) < 150_000
    for transform in (TrainTransform(224), EvalTransform(224)):  # the 40 MP default, as the loader builds them
        started = time.perf_counter()
        with pytest.raises(
            CorruptImageError,
            match="declares 12000x12000 = 144,000,000 pixels, more than data.max_image_pixels = 40,000,000",
        ) as caught:
            transform(data, random.Random(0))
        assert "\n" not in str(caught.value)
        assert time.perf_counter() - started < 0.5  # decoding it took 4.5 s


@pytest.mark.parametrize("format", ["JPEG", "PNG", "WEBP"])
def test_the_limit_admits_exactly_max_image_pixels(format):
    data = saved(format, size=(70, 50))
    for transform in (TrainTransform(32, max_image_pixels=70 * 50), EvalTransform(32, max_image_pixels=70 * 50)):
        assert transform(data, random.Random(0)).shape == (3, 32, 32)
    for transform in (TrainTransform(32, max_image_pixels=70 * 50 - 1), EvalTransform(32, max_image_pixels=3499)):
        with pytest.raises(CorruptImageError, match="declares 70x50 = 3,500 pixels"):
            transform(data, random.Random(0))


def test_the_device_route_refuses_oversized_headers_before_decoding(monkeypatch):
    transform, picture = EvalTransform(32, crop_ratio=1.0), encode(smooth_picture(64, 48))  # decoded at full size
    with pytest.raises(CorruptImageError, match="12000x12000"):  # in the loader process
        prepare_for_device(bomb_jpeg(), transform, random.Random(0))
    # A slot built elsewhere (or bytes altered after the loader process read them) is refused on the device too,
    # from the very bytes the decoder would get; the others in the batch still decode.
    good, expected = prepare_for_device(picture, transform, random.Random(0)), transform(picture)
    bomb = EncodedImage(torch.frombuffer(bytearray(bomb_jpeg()), dtype=torch.uint8), good.geometry)
    handed_to_the_decoder = []
    real_decode = transforms.decode_jpeg
    monkeypatch.setattr(
        transforms,
        "decode_jpeg",
        lambda jpegs, **keywords: handed_to_the_decoder.extend(jpegs) or real_decode(jpegs, **keywords),
    )
    outputs = decode_on_device([good, bomb, good], train=False, size=32, device=torch.device("cpu"))
    assert outputs[1] is None
    assert torch.equal(outputs[0], expected) and torch.equal(outputs[2], expected)
    assert [len(jpeg) for jpeg in handed_to_the_decoder] == [len(picture)] * 2
    # The limit is the caller's: the loader passes data.max_image_pixels.
    assert decode_on_device([good], False, 32, torch.device("cpu"), max_image_pixels=64 * 48 - 1) == [None]


# pytorch/vision#9606: torchvision's CUDA decode_jpeg allocates its outputs on the caller's stream and writes
# them from its own, unordered with the caller's. These tests queue reads behind a long GPU sleep, free their
# memory (as a training step frees activations) and decode at once: with the decode ordered wrongly the decoder
# is handed that memory and overwrites it before the queued reads run.


def _device_slots(seed: int, count: int = 4) -> list[EncodedImage]:
    data = encode(smooth_picture(64, 48, seed))  # decodes to 3 x 48 x 64 = 9216 bytes
    geometry = EvalTransform(32, crop_ratio=1.0).geometry(64, 48)  # resized to 42 x 32: a real resize kernel
    return [EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), geometry)] * count


GPU_SLEEP_CYCLES = 200_000_000  # ~0.1 s at 2 GHz: far longer than decoding four 64 x 48 JPEGs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_decoding_never_writes_memory_that_queued_kernels_still_read():
    device = torch.device("cuda")
    slots = _device_slots(0)
    decode_on_device(slots, False, 32, device)  # warm: nvJPEG's decoder, the kernels
    numel = 3 * 48 * 64 // 4  # float32 victims of exactly one decoded image's bytes
    wrong = 0
    for _ in range(20):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        victims = [torch.ones(numel, device=device) for _ in range(8)]
        torch.cuda._sleep(GPU_SLEEP_CYCLES)
        sums = [victim.sum() for victim in victims]  # queued behind the sleep
        del victims  # freed on the compute stream, their reads still queued
        decode_on_device(slots, False, 32, device)
        torch.cuda.synchronize(device)
        wrong += sum(total.item() != numel for total in sums)
    assert wrong == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decoded_images_are_not_reused_while_their_crops_are_still_queued():
    device = torch.device("cuda")
    first, second = _device_slots(1), _device_slots(2)
    expected = decode_on_device(first, False, 32, device)
    torch.cuda.synchronize(device)
    torch.cuda._sleep(GPU_SLEEP_CYCLES)
    # The full-size images are freed when the call returns, with their resizes queued behind the sleep; the next
    # decode must not be handed their memory (it writes at once, whatever the streams say).
    outputs = decode_on_device(first, False, 32, device)
    decode_on_device(second, False, 32, device)
    torch.cuda.synchronize(device)
    assert all(torch.equal(output, reference) for output, reference in zip(outputs, expected))
