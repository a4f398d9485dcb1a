"""Decode and augment encoded images (JPEG bytes from the shards) into uint8 CHW tensors, fast.

The loader ships uint8 images (4x less memory and inter-process traffic than float32) and the training step
normalises them on the device with `normalize_batch`:

    transform = TrainTransform(224)
    image = transform(jpeg_bytes, random.Random(seed))   # uint8 (3, 224, 224), same seed -> same image
    batch = normalize_batch(torch.stack(images), "cuda")  # float32 (N, 3, 224, 224), ImageNet mean/std

Where the time goes, per 500x375 quality-90 JPEG of ~100 KB on one core (`imagenet-pipeline bench-data`):
libjpeg-turbo's decode is ~1.4 ms and is the floor (mostly entropy decoding, which no scale or DCT option
skips); torchvision's reference path adds ~1.8 ms on top, ours ~0.35 ms:
- torchvision.io.decode_jpeg decodes straight into a tensor; PIL's decode is ~0.05-0.3 ms slower (it
  unpacks to 4 bytes per pixel and needs another copy to reach numpy);
- torch's vectorised uint8 antialiased bilinear resize takes ~0.28 ms for a 224 px crop where PIL's takes
  ~0.6 ms, and agrees with it within one grey level; the crop is a view, so crop + resize is one pass;
- no float conversion or normalisation on the CPU (~0.4 ms in the reference at 224 px).
When the crop is at least twice the output size, PIL's `Image.draft` lets libjpeg decode at 1/2, 1/4 or 1/8
scale (skipping most of the inverse DCT and colour conversion): +35-60% on 1500x1125 photos, a few % at
128-160 px on ImageNet-sized ones, never at 224 px on them. libjpeg's fast-DCT / no-fancy-upsampling switches
are not reachable through public Pillow or torchvision API (Pillow's private `decoderconfig` gained ~3%).
torchvision 0.29 deprecates its image decoders in favour of TorchCodec (pyproject caps torchvision at 0.29.1);
PIL's decode with the same torch resize is the fallback, measured ~15% slower.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.config import DEFAULT_MAX_IMAGE_PIXELS
from pipeline.data.image_header import DECODE_ERRORS, CorruptImageError, checked_size, open_header
from pipeline.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# RandomResizedCrop's aspect-ratio range (width / height), as in torchvision and the 2014 Inception paper.
CROP_ASPECT_RATIOS = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10
# libjpeg can decode at these reductions (1/8 ... 1/2); largest first so the cheapest adequate one wins.
DRAFT_SCALES = (8, 4, 2)
# Pillow names camera JPEGs with a multi-picture (MPO) segment "MPO"; the first frame is a plain JPEG.
JPEG_FORMATS = ("JPEG", "MPO")


def sample_crop(
    width: int,
    height: int,
    rng: random.Random,
    min_scale: float = 0.08,
    aspect_ratios: tuple[float, float] = CROP_ASPECT_RATIOS,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, crop_height, crop_width), drawn from `rng` instead of torch's RNG.

    Same sampling as `torchvision.transforms.RandomResizedCrop.get_params`: area share uniform in
    (min_scale, 1), log aspect ratio uniform, 10 tries, then the whole image clipped to the ratio range.
    """
    area = width * height
    log_low, log_high = math.log(aspect_ratios[0]), math.log(aspect_ratios[1])
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(min_scale, 1.0)
        aspect_ratio = math.exp(rng.uniform(log_low, log_high))
        crop_width = int(round(math.sqrt(target_area * aspect_ratio)))
        crop_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = rng.randint(0, height - crop_height)
            left = rng.randint(0, width - crop_width)
            return top, left, crop_height, crop_width

    # Fallback: the largest centred box whose aspect ratio is inside the range.
    image_ratio = width / height
    if image_ratio < aspect_ratios[0]:
        crop_width, crop_height = width, int(round(width / aspect_ratios[0]))
    elif image_ratio > aspect_ratios[1]:
        crop_width, crop_height = int(round(height * aspect_ratios[1])), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def choose_draft_scale(region_width: float, region_height: float, output_width: int, output_height: int) -> int:
    """The largest libjpeg reduction (8, 4, 2 or 1) after which the region still covers the output size.

    Keeping the reduced region >= the output means the final resize only ever shrinks, so quality stays that of
    a full decode followed by an antialiased downscale.
    """
    for scale in DRAFT_SCALES:
        if region_width / scale >= output_width and region_height / scale >= output_height:
            return scale
    return 1


class TrainTransform:
    """RandomResizedCrop(image_size, scale=(min_scale, 1)) + horizontal flip (p=0.5), uint8 CHW out.

    Every random choice comes from the `rng` argument, so a (seed, sample) pair always gives the same image.
    Images declaring more than `max_image_pixels` are refused from their header (`pipeline.data.image_header`).
    """

    def __init__(
        self, image_size: int, min_scale: float = 0.08, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> None:
        self.image_size = _check_image_size(image_size)
        if not 0.0 < min_scale <= 1.0:
            raise ConfigError(f"min_scale = {min_scale} must be in (0, 1]: the smallest crop area share")
        self.min_scale = float(min_scale)
        self.max_image_pixels = _check_max_image_pixels(max_image_pixels)

    def geometry(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int, bool]:
        """(top, left, crop height, crop width, flip): every random draw, in the order both decode routes use."""
        top, left, crop_height, crop_width = sample_crop(width, height, rng, self.min_scale)
        return top, left, crop_height, crop_width, rng.random() < 0.5

    def __call__(self, image_bytes: bytes, rng: random.Random) -> torch.Tensor:
        # Header only (JPEG, PNG or WebP): size and format, no pixels yet; refused above max_image_pixels.
        image = open_header(image_bytes, self.max_image_pixels)
        width, height = image.size
        top, left, crop_height, crop_width, flip = self.geometry(width, height, rng)
        size = self.image_size
        scale = _draft_scale(image, crop_width, crop_height, size)
        if scale > 1:
            box = (left, top, left + crop_width, top + crop_height)
            output = _decode_reduced_and_resize(image, scale, box, size)
        else:
            pixels = _decode_full_size(image_bytes, image)
            output = _resize(pixels[:, top : top + crop_height, left : left + crop_width], size, size)  # crop: a view
        if flip:
            output = output.flip(-1)  # on the small output: 3*S*S bytes
        return output.contiguous()

    def __repr__(self) -> str:
        return (
            f"TrainTransform(image_size={self.image_size}, min_scale={self.min_scale}, "
            f"max_image_pixels={self.max_image_pixels})"
        )


class EvalTransform:
    """Resize the shorter side to round(image_size / crop_ratio), centre-crop image_size: uint8 CHW out.

    torchvision's classic evaluation preset (Resize(256) + CenterCrop(224) for 224 px). The optional `rng`
    argument is ignored; it lets the loader call both transforms the same way. Images declaring more than
    `max_image_pixels` are refused from their header.
    """

    def __init__(
        self, image_size: int, crop_ratio: float = 0.875, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> None:
        self.image_size = _check_image_size(image_size)
        if not 0.0 < crop_ratio <= 1.0:
            raise ConfigError(f"crop_ratio = {crop_ratio} must be in (0, 1]: crop side / resized shorter side")
        self.crop_ratio = float(crop_ratio)
        self.max_image_pixels = _check_max_image_pixels(max_image_pixels)
        self.resize_size = int(round(self.image_size / self.crop_ratio))

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the shorter-side resize, rounded down like torchvision's Resize(int)."""
        if width <= height:
            return self.resize_size, int(self.resize_size * height / width)
        return int(self.resize_size * width / height), self.resize_size

    def geometry(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(resized height, resized width, top, left): the shorter-side resize, then the centre crop's corner."""
        resized_width, resized_height = self.resized_size(width, height)
        top = int(round((resized_height - self.image_size) / 2.0))
        left = int(round((resized_width - self.image_size) / 2.0))
        return resized_height, resized_width, top, left

    def __call__(self, image_bytes: bytes, rng: random.Random | None = None) -> torch.Tensor:
        image = open_header(image_bytes, self.max_image_pixels)
        width, height = image.size
        resized_height, resized_width, top, left = self.geometry(width, height)
        size = self.image_size
        x_scale, y_scale = width / resized_width, height / resized_height
        scale = _draft_scale(image, size * x_scale, size * y_scale, size)
        if scale > 1:
            # The centre crop in original pixels: resizing just this box samples exactly the same points, with
            # the same filter width, as resizing the whole image and then cropping.
            box = (left * x_scale, top * y_scale, (left + size) * x_scale, (top + size) * y_scale)
            return _decode_reduced_and_resize(image, scale, box, size).contiguous()
        # Resize whole, then cut: torchvision's exact geometry; the margin costs little next to decoding.
        resized = _resize(_decode_full_size(image_bytes, image), resized_height, resized_width)
        return resized[:, top : top + size, left : left + size].contiguous()

    def __repr__(self) -> str:
        return (
            f"EvalTransform(image_size={self.image_size}, crop_ratio={self.crop_ratio}, "
            f"max_image_pixels={self.max_image_pixels})"
        )


def normalize_batch(
    images_uint8: torch.Tensor, device: torch.device | str, channels_last: bool = False
) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with the ImageNet mean/std, computed on `device`.

    Equals `Normalize(IMAGENET_MEAN, IMAGENET_STD)(ToTensor()(image))` per image. The copy to the device is
    non-blocking (asynchronous when the batch is in pinned memory) and moves 1 byte per value, not 4.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ValueError(
            f"images must be uint8 of shape (N, 3, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    device = torch.device(device)
    images = images_uint8.to(device, non_blocking=True)
    if channels_last:
        # On the uint8 tensor: a quarter of the bytes to rearrange; the float ops below keep the layout.
        images = images.contiguous(memory_format=torch.channels_last)
    mean, std = _mean_and_std_in_grey_levels(device)
    return images.float().sub_(mean).div_(std)


@lru_cache(maxsize=None)
def _mean_and_std_in_grey_levels(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # (x / 255 - mean) / std == (x - 255 mean) / (255 std): one subtraction and one division per value.
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).mul_(255.0).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).mul_(255.0).view(1, 3, 1, 1)
    return mean, std


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size = {image_size!r} must be a whole number of pixels, at least 1")
    return image_size


def _check_max_image_pixels(max_image_pixels: int) -> int:
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        raise ConfigError(f"max_image_pixels = {max_image_pixels!r} must be a whole number of pixels, at least 1")
    return max_image_pixels


def _draft_scale(image: Image.Image, region_width: float, region_height: float, size: int) -> int:
    """How much libjpeg may shrink while decoding (1 for non-JPEG formats, which have no reduced decode)."""
    if image.format not in JPEG_FORMATS:
        return 1
    return choose_draft_scale(region_width, region_height, size, size)


def _decode_full_size(image_bytes: bytes, image: Image.Image) -> torch.Tensor:
    """All pixels as uint8 (3, H, W) RGB, with any strides."""
    try:
        if image.format in JPEG_FORMATS:
            # bytearray: decode_jpeg wants a writable buffer; copying ~100 KB costs a few microseconds.
            # Grey and CMYK JPEGs come out as RGB, identical to PIL's convert("RGB").
            encoded = torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8)
            return decode_jpeg(encoded, mode=ImageReadMode.RGB)
        # PNG, WebP, ...: rare in ImageNet shards. np.array makes a writable copy that torch may share.
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    except DECODE_ERRORS as error:
        raise CorruptImageError(f"cannot decode a {image.format or 'unknown'} image: {error}") from error


def _decode_reduced_and_resize(
    image: Image.Image, scale: int, box: tuple[float, float, float, float], size: int
) -> torch.Tensor:
    """libjpeg decodes at 1/scale; one PIL resize maps the box (original pixels) from there to size x size.

    PIL takes fractional boxes, so the output samples exactly the requested crop; rounding the box to reduced
    pixels instead shifts it by up to scale/2 original pixels (3x the difference to a full decode, measured).
    """
    try:
        original_width = image.width  # draft() shrinks image.size to the reduced size
        draft = image.draft("RGB", (image.width // scale, image.height // scale))
        # draft() returns the reduced image's extent in original pixels; None if it declined (full decode).
        reduction = original_width / draft[1][2] if draft is not None else 1.0
        left, top, right, bottom = (coordinate / reduction for coordinate in box)
        # The reduced image is ceil(width / scale) wide, so the box fits; min() guards float rounding anyway.
        reduced_box = (left, top, min(right, image.width), min(bottom, image.height))
        output = image.convert("RGB").resize((size, size), Image.BILINEAR, box=reduced_box)
    except DECODE_ERRORS as error:
        raise CorruptImageError(f"cannot decode a {image.format} image at 1/{scale} size: {error}") from error
    return torch.from_numpy(np.array(output)).permute(2, 0, 1)


def _resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (3, h, w) (torch's vectorised uint8 kernel; ±1 level of PIL's)."""
    if pixels.shape[1] == height and pixels.shape[2] == width:
        return pixels
    return F.interpolate(
        pixels.unsqueeze(0), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )[0]


# Decoding on the device (data.decode = gpu): the loader processes read the bytes and draw the geometry above
# (the same random stream as the CPU route); the training process decodes the batch where it trains.


class EncodedImage(NamedTuple):
    """One slot of a batch to decode on the device: JPEG bytes and the geometry its transform drew, or an image
    the loader process already decoded (a non-JPEG, rare in ImageNet shards, has no device decoder)."""

    data: torch.Tensor  # uint8: the encoded JPEG (1-d), or the finished (3, S, S) image when `ready`
    geometry: tuple[int, ...]  # TrainTransform.geometry or EvalTransform.geometry
    ready: bool = False


def prepare_for_device(
    image_bytes: bytes, transform: "TrainTransform | EvalTransform", rng: random.Random
) -> EncodedImage:
    """What a loader process does for a slot when the device decodes: read the header (refused above the
    transform's max_image_pixels), draw the geometry."""
    image = open_header(image_bytes, transform.max_image_pixels)
    if image.format not in JPEG_FORMATS or image.mode == "CMYK":
        return EncodedImage(transform(image_bytes, rng), (), ready=True)
    width, height = image.size
    geometry = (
        transform.geometry(width, height, rng)
        if isinstance(transform, TrainTransform)
        else transform.geometry(width, height)
    )
    return EncodedImage(torch.frombuffer(bytearray(image_bytes), dtype=torch.uint8), geometry)


def decode_on_device(
    slots: list[EncodedImage],
    train: bool,
    size: int,
    device: torch.device,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[torch.Tensor | None]:
    """uint8 (3, size, size) images on `device` for `slots` (None where the bytes do not decode, or declare more
    than `max_image_pixels`): one batched nvJPEG call on a GPU (torchvision.io.decode_jpeg), then crop, resize
    and flip there."""
    decoded: dict[int, torch.Tensor | None] = {}
    declared: dict[int, tuple[int, int]] = {}  # (width, height) per JPEG slot within the limit
    for index, slot in enumerate(slots):
        if slot.ready:
            continue
        try:
            # Read again from the very bytes the decoder gets (a loader process read them with PIL): the device
            # never allocates for an image over the limit, whoever built the slot.
            declared[index] = checked_size(memoryview(slot.data.numpy()), max_image_pixels)
        except CorruptImageError:
            decoded[index] = None
    jpegs = list(declared)
    if jpegs:
        try:
            decoded.update(zip(jpegs, _decode_jpegs([slots[i].data for i in jpegs], device)))
        except DECODE_ERRORS:  # one bad image fails the batched call: find it one by one
            if device.type == "cuda":
                # The failed call's outputs went back to the decode stream's pool while nvJPEG may still be
                # writing them; the retries below would be handed those blocks. Rare: corrupt samples only.
                torch.cuda.synchronize(device)
            for index in jpegs:
                try:
                    decoded[index] = _decode_jpegs([slots[index].data], device)[0]
                except DECODE_ERRORS:
                    decoded[index] = None
    outputs: list[torch.Tensor | None] = []
    for index, slot in enumerate(slots):
        if slot.ready:
            outputs.append(slot.data.to(device, non_blocking=True))
            continue
        pixels = decoded[index]
        if pixels is None or tuple(pixels.shape[1:]) != declared[index][::-1]:
            outputs.append(None)  # undecodable, or not the size its geometry was drawn for
        elif train:
            top, left, crop_height, crop_width, flip = slot.geometry
            output = _resize_on(pixels[:, top : top + crop_height, left : left + crop_width], size, size)
            outputs.append(output.flip(-1) if flip else output)
        else:
            resized_height, resized_width, top, left = slot.geometry
            outputs.append(_resize_on(pixels, resized_height, resized_width)[:, top : top + size, left : left + size])
    return outputs


def _decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """`decode_jpeg` of a list, ordered with the caller's (compute) stream on a GPU.

    torchvision's CUDA decode allocates its outputs on the current stream but writes them from a private stream
    that never waits for the current one (pytorch/vision#9606), and nvJPEG's hardware engine writes when called
    whatever a stream says (meta-pytorch/torchcodec#1634). PyTorch's caching allocator hands a block out again
    as soon as it is freed on its stream, so with the compute stream current the decoder is given memory that
    queued kernels (the last step's) have yet to read, and overwrites it. Synchronizing the compute stream
    before each call would be correct too, but it drains the GPU's queue every step. Cheaper: call with a
    stream of our own current, on which nothing else ever runs, so its pool only holds blocks no queued kernel
    reads. Then the compute stream waits for that stream (which torchvision has made wait for the decode), and
    `record_stream` keeps each output's block out of that pool until the compute stream's reads of it are done.
    """
    if device.type != "cuda":
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    compute, decode_stream = torch.cuda.current_stream(device), _decode_stream(device)
    with torch.cuda.stream(decode_stream):
        images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    compute.wait_stream(decode_stream)
    for image in images:
        image.record_stream(compute)
    return images


@lru_cache(maxsize=None)
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream nvJPEG's outputs are allocated on, one per device and process (see `_decode_jpegs`)."""
    return torch.cuda.Stream(device)


def _resize_on(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`_resize` where the pixels are: torch's uint8 antialiased kernel on CPUs, float32 and rounding elsewhere."""
    if pixels.device.type == "cpu":
        return _resize(pixels, height, width)
    if pixels.shape[1] == height and pixels.shape[2] == width:
        return pixels
    resized = F.interpolate(
        pixels.unsqueeze(0).float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)
