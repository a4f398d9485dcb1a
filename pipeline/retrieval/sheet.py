"""A contact sheet: each query image beside its nearest gallery images, labelled, wrong classes marked red.

    imagenet-pipeline retrieve photos/ --index embeddings/imagenet-classifier-v3/train --sheet sheet.png

Gallery thumbnails are read back from the gallery's shards (the embedding remembers each row's shard and
position). Built on `matplotlib.figure.Figure`: no display and no pyplot backend. An image that cannot be shown
(not JPEG, PNG or WebP, damaged, or declaring more than data.max_image_pixels: refused from its header) gets a
grey placeholder tile.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline import storage
from pipeline.config import Config
from pipeline.data.image_header import DECODE_ERRORS, open_header
from pipeline.data.manifest import read_manifest
from pipeline.data.shard_reader import read_whole_shard
from pipeline.retrieval.retrieve import Gallery, QueryResult

THUMBNAIL = 128  # px, longer side
PLACEHOLDER = 0.85  # grey level of the tile drawn for an image that cannot be shown
WRONG, RIGHT = "tab:red", "tab:green"


def contact_sheet(results: list[QueryResult], gallery: Gallery, config: Config, output: Path) -> Path:
    thumbnails = _gallery_thumbnails(results, gallery, config)
    columns = 1 + max(len(result.neighbours) for result in results)
    figure = Figure(figsize=(1.7 * columns, 2.0 * len(results)))
    grid = figure.subplots(len(results), columns, squeeze=False)
    for row, result in enumerate(results):
        named = _short(result.known_class) if result.known_class else f"model: {_short(result.predicted)}"
        query = _thumbnail(result.path.read_bytes(), config.data.max_image_pixels)
        _show(grid[row][0], query, f"query\n{named}", "black", linewidth=3)
        for column, neighbour in enumerate(result.neighbours, start=1):
            right = neighbour.class_name == result.reference_class
            _show(
                grid[row][column],
                thumbnails.get(neighbour.row),
                f"{neighbour.rank}. {_short(neighbour.class_name)}\n{neighbour.similarity:.3f}",
                RIGHT if right else WRONG,
                linewidth=1.5 if right else 4,
            )
        for column in range(len(result.neighbours) + 1, columns):
            grid[row][column].axis("off")
    figure.suptitle(
        f"nearest {gallery.meta.split} images by {gallery.meta.layer} features of "
        f"{gallery.meta.model_source} (red: another class than the query's)",
        fontsize=10,
    )
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png", dpi=100)
    return output


def _gallery_thumbnails(results: list[QueryResult], gallery: Gallery, config: Config) -> dict[int, np.ndarray]:
    wanted: dict[int, dict[int, int]] = defaultdict(dict)  # shard -> {index in shard: gallery row}
    for result in results:
        for neighbour in result.neighbours:
            wanted[neighbour.shard][neighbour.index_in_shard] = neighbour.row
    root = (
        gallery.meta.data_root
        if storage.is_url(gallery.meta.data_root) or Path(gallery.meta.data_root).is_dir()
        else config.data.root
    )
    split_dir = storage.join(root, gallery.meta.split)
    manifest = read_manifest(split_dir, config.data.shard_url_schemes)
    thumbnails = {}
    for shard, rows in wanted.items():
        last = max(rows)
        for position, (image, _, _) in enumerate(
            read_whole_shard(split_dir, manifest, shard, config.data.shard_command)
        ):
            if position in rows and image is not None:
                thumbnails[rows[position]] = _thumbnail(image, config.data.max_image_pixels)
            if position >= last:
                break
    return thumbnails


def _thumbnail(data: bytes, max_image_pixels: int) -> np.ndarray | None:
    """At most THUMBNAIL px on the longer side; None (a placeholder) where the image cannot be shown."""
    try:
        with open_header(data, max_image_pixels) as image:  # refused here, from the header, when too large
            image.draft("RGB", (THUMBNAIL, THUMBNAIL))
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            return np.asarray(image)
    except DECODE_ERRORS:  # CorruptImageError, the refusal, is a ValueError
        return None


def _show(axes, pixels: np.ndarray | None, title: str, colour: str, linewidth: float) -> None:
    if pixels is None:  # a plain tile, so a missing image reads as missing rather than as a layout gap
        axes.imshow(np.full((THUMBNAIL, THUMBNAIL), PLACEHOLDER), cmap="gray", vmin=0.0, vmax=1.0)
        axes.text(0.5, 0.5, "cannot show", ha="center", va="center", fontsize=7, transform=axes.transAxes)
    else:
        axes.imshow(pixels)
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(linewidth)
    axes.set_title(title, fontsize=8, color=colour)


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"
