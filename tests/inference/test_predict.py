"""Predicting image files with the shared trained run: top-k, names, JSON, and unreadable files."""

import json

import pytest
import webdataset as wds

from pipeline.data.manifest import read_manifest
from pipeline.data.synthetic import make_jpeg_bytes
from pipeline.inference.evaluate import evaluate_model
from pipeline.inference.predict import find_images, format_predictions, predict

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAMPION = "models:/test-model@champion"


@pytest.fixture(scope="module")
def test_images(trained_run, tmp_path_factory):
    """Every test-split JPEG as a file, `<label>/<key>.JPEG`: the ImageNet folder layout, upper-case suffix."""
    folder = tmp_path_factory.mktemp("test_images")
    shards = sorted(str(path) for path in (trained_run.shards / "test").glob("*.tar"))
    for sample in wds.WebDataset(shards, shardshuffle=False):
        label = int(sample["cls"])
        (folder / str(label)).mkdir(exist_ok=True)
        (folder / str(label) / f"{sample['__key__'].replace('/', '_')}.JPEG").write_bytes(sample["jpg"])
    return folder


@pytest.fixture(scope="module")
def champion_predictions(trained_run, test_images):
    return predict(trained_run.config, CHAMPION, [test_images])


def test_folder_gives_sorted_top_k_with_names_and_wnids(trained_run, test_images, champion_predictions):
    classes = read_manifest(trained_run.shards / "test").classes
    assert len(champion_predictions) == 24
    for prediction in champion_predictions:
        assert prediction.error is None
        probabilities = [score.probability for score in prediction.top]
        assert len(probabilities) == 4  # top-5 of a 4-class model: all 4
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0.0 <= sum(probabilities) <= 1.0 + 1e-5
        for score in prediction.top:
            assert (score.name, score.wnid) == (classes[score.index].name, classes[score.index].wnid)


def test_predictions_agree_with_the_evaluated_top1(trained_run, champion_predictions):
    # Same preprocessing as the test loader, so the files' top-1 accuracy is the evaluated one.
    correct = sum(p.top[0].index == int(p.path.parent.name) for p in champion_predictions)
    report = evaluate_model(trained_run.config, CHAMPION, log_to_mlflow=False, again_reason="tests: predict agrees")
    assert 100.0 * correct / len(champion_predictions) == pytest.approx(report.top1)


def test_checkpoint_and_registry_predict_alike(trained_run, test_images, champion_predictions):
    files = champion_predictions[:3]
    from_checkpoint = predict(trained_run.config, trained_run.outcome.best_checkpoint, [p.path for p in files])
    for registry, checkpoint in zip(files, from_checkpoint):
        assert [s.index for s in checkpoint.top] == [s.index for s in registry.top]
        assert checkpoint.top[0].probability == pytest.approx(registry.top[0].probability, abs=1e-4)


def test_top_k_limits_and_json_round_trips(trained_run, test_images):
    predictions = predict(trained_run.config, CHAMPION, [test_images / "0"], top_k=2)
    assert all(len(p.top) == 2 for p in predictions)
    parsed = json.loads(format_predictions(predictions, as_json=True))
    assert [row["path"] for row in parsed] == [str(p.path) for p in predictions]
    assert parsed[0]["top"][0].keys() == {"index", "wnid", "name", "probability"}
    assert parsed[0]["top"][0]["probability"] == pytest.approx(predictions[0].top[0].probability)
    table = format_predictions(predictions, as_json=False)
    assert str(predictions[0].path) in table and predictions[0].top[0].name in table


def test_unreadable_file_is_reported_and_the_rest_classified(trained_run, tmp_path):
    (tmp_path / "garbage.jpg").write_bytes(b"definitely not a JPEG")
    (tmp_path / "good.png").write_bytes(make_jpeg_bytes(48, 40, seed=1, format="PNG"))
    (tmp_path / "notes.txt").write_text("skipped: not an image suffix")
    predictions = predict(trained_run.config, CHAMPION, [tmp_path])
    by_name = {p.path.name: p for p in predictions}
    assert set(by_name) == {"garbage.jpg", "good.png"}
    assert by_name["garbage.jpg"].error and by_name["garbage.jpg"].top == []
    assert by_name["good.png"].error is None and len(by_name["good.png"].top) == 4
    table = format_predictions(predictions, as_json=False)
    assert "error:" in table and "1 classified, 1 unreadable" in table


def test_bad_inputs_are_value_errors(trained_run, tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        find_images([tmp_path / "missing.jpg"])
    with pytest.raises(ValueError, match="no image files"):
        find_images([tmp_path])
    with pytest.raises(ValueError, match="top_k = 0"):
        predict(trained_run.config, CHAMPION, [tmp_path], top_k=0)


def test_a_decompression_bomb_is_one_line_in_its_row_and_never_decoded(tmp_path, monkeypatch):
    """Refused from the header before the model sees anything, so a stand-in model will do (no trained run)."""
    from types import SimpleNamespace

    import torch
    from PIL import ImageFile

    from pipeline.config import Config
    from pipeline.inference import predict as predict_module
    from tests.data.test_image_header import bomb_jpeg, bomb_png

    (tmp_path / "huge.png").write_bytes(bomb_png())
    (tmp_path / "huge.jpg").write_bytes(bomb_jpeg())
    (tmp_path / "fine.jpg").write_bytes(make_jpeg_bytes(48, 40, seed=1))
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 2)).eval()
    loaded = SimpleNamespace(model=model, class_names=["cat", "dog"], architecture="resnet18", eval_image_size=32)
    monkeypatch.setattr(predict_module, "load_model_for_inference", lambda source, config, *rest: loaded)
    real_load = ImageFile.ImageFile.load

    def load(image):
        assert image.size[0] * image.size[1] < 1_000_000, f"a {image.size} image was decoded"
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    config = Config(data={"root": str(tmp_path / "no-shards")})  # no manifest: no wnids
    by_name = {p.path.name: p for p in predict(config, "a-checkpoint", [tmp_path])}
    assert by_name["fine.jpg"].error is None and len(by_name["fine.jpg"].top) == 2
    for name in ("huge.png", "huge.jpg"):
        assert by_name[name].top == []
        assert by_name[name].error == (
            "declares 12000x12000 = 144,000,000 pixels, more than data.max_image_pixels "
            "= 40,000,000; refused before decoding"
        )
    assert "1 classified, 2 unreadable" in format_predictions(list(by_name.values()))
