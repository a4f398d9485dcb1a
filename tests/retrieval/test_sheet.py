"""The contact sheet: images that cannot be shown (decompression bombs included) become placeholder tiles."""

from types import SimpleNamespace

import webdataset as wds
from PIL import Image, ImageFile

from pipeline.config import Config
from pipeline.retrieval import sheet
from pipeline.retrieval.retrieve import Neighbour, QueryResult
from tests.conftest import jpeg_bytes, write_split
from tests.data.test_image_header import bomb_jpeg, bomb_png


def test_a_decompression_bomb_becomes_a_placeholder_tile_and_is_never_decoded(tmp_path, monkeypatch):
    root = tmp_path / "shards"
    write_split(root / "val", [3])
    with wds.TarWriter(str(root / "val" / "val-000000.tar")) as writer:  # sample 1 of the gallery is a bomb
        for i, image in enumerate((jpeg_bytes(0, 0), bomb_jpeg(), jpeg_bytes(2, 2))):
            writer.write({"__key__": f"s{i:06d}", "jpg": image, "cls": str(i).encode()})
    query = tmp_path / "query.png"
    query.write_bytes(bomb_png())
    neighbours = [
        Neighbour(rank, row, f"s{row:06d}", row, f"class {row}", 0.9 - rank / 10, 0, row)
        for rank, row in enumerate((0, 1, 2), start=1)
    ]
    results = [QueryResult(query, "class 0", None, neighbours)]
    gallery = SimpleNamespace(
        meta=SimpleNamespace(data_root=str(root), split="val", layer="pool", model_source="models:/m/1")
    )
    real_load = ImageFile.ImageFile.load

    def load(image):
        assert image.size[0] * image.size[1] < 1_000_000, f"a {image.size} image was decoded"
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    shown = []
    real_show = sheet._show
    monkeypatch.setattr(
        sheet,
        "_show",
        lambda axes, pixels, *rest, **keywords: (
            shown.append(pixels is not None) or real_show(axes, pixels, *rest, **keywords)
        ),
    )

    output = sheet.contact_sheet(results, gallery, Config(data={"root": str(root)}), tmp_path / "sheet.png")

    assert shown == [False, True, False, True]  # the query, then neighbours 1 (fine), 2 (the bomb), 3 (fine)
    with Image.open(output) as picture:
        assert picture.format == "PNG"
        picture.load()


def test_thumbnails_are_small_and_unshowable_images_give_none():
    config_limit = Config().data.max_image_pixels
    thumbnail = sheet._thumbnail(jpeg_bytes(1, 1, size=(400, 300)), config_limit)
    assert thumbnail.shape == (96, 128, 3)
    for data in (bomb_png(), bomb_jpeg(), b"not an image", jpeg_bytes(1, 1)[:100]):
        assert sheet._thumbnail(data, config_limit) is None
    assert sheet._thumbnail(jpeg_bytes(1, 1), 40 * 30 - 1) is None  # the configured limit, not a fixed one
