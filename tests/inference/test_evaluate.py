"""Held-out evaluation of the shared trained run: from the registry, a run and a checkpoint; bad sources refused."""

import json

import pytest
from mlflow.tracking import MlflowClient

from pipeline import metrics as m
from pipeline.data.manifest import read_manifest
from pipeline.inference.evaluate import evaluate_model, load_model_for_inference
from pipeline.tracking.heldout import TEST_EVALUATION_TAG
from tests.conftest import write_split

pytestmark = [pytest.mark.ray, pytest.mark.slow]

CHAMPION = "models:/test-model@champion"
TEST_SAMPLES = 24  # learnable_shards: 4 classes x 6 official-val images become the test split


def _with(config, **data):
    return config.model_copy(update={"data": config.data.model_copy(update=data)})


@pytest.fixture(scope="module")
def champion_report(trained_run):
    return evaluate_model(trained_run.config, CHAMPION)


def test_champion_beats_chance_on_test_and_logs_to_its_training_run(trained_run, champion_report):
    report = champion_report
    assert report.num_samples == TEST_SAMPLES and report.corrupt_samples == 0
    assert report.top1 > 50.0  # 4 classes: chance is 25 %
    assert report.top1 <= report.top5 == pytest.approx(100.0)  # top-5 of 4 classes always hits
    assert report.architecture == "resnet18" and report.num_classes == 4 and report.eval_image_size == 32
    assert report.logged_to_run == trained_run.outcome.mlflow_run_id
    logged = MlflowClient(trained_run.tracking_uri).get_run(report.logged_to_run).data.metrics
    assert logged[m.TEST_TOP1] == pytest.approx(report.top1)
    assert logged[m.TEST_TOP5] == pytest.approx(report.top5)
    assert logged[m.TEST_TOP5_ERROR] == pytest.approx(100.0 - report.top5)
    # The features from the same pass: k-NN with the train gallery, retrieval within test, all logged once.
    features = report.features
    assert features.layer == "avgpool" and features.dim == 512 and features.gallery.startswith("embedded now")
    assert features.knn_top1 > 50.0 and features.within_split["recall_at_1"] > 50.0
    assert features.within_split["recall_at_1"] <= features.within_split["recall_at_5"] <= 100.0
    for key in (m.TEST_KNN_TOP1, m.TEST_MAP_AT_R, m.TEST_RECALL_AT.format(k=1), m.TEST_RECALL_AT.format(k=10)):
        assert logged[key] == pytest.approx(report.metrics()[key])


def test_table_shows_human_and_published_figures_and_says_this_is_not_imagenet(trained_run, capsys):
    evaluate_model(trained_run.config, CHAMPION, log_to_mlflow=False, again_reason="tests: the table's rows")
    table = capsys.readouterr().out
    assert "human annotator" in table and "5.1" in table
    assert "published resnet18" in table and "69.76" in table  # torchvision's ResNet-18 top-1
    assert "not ImageNet-1k" in table
    assert "features (avgpool, 512-d): k-NN top-1" in table and "mAP@R" in table


def test_checkpoint_directory_gives_the_same_figures_and_logs_nothing(trained_run, champion_report):
    report = evaluate_model(trained_run.config, trained_run.outcome.best_checkpoint)
    assert (report.top1, report.top5, report.num_samples) == (
        champion_report.top1,
        champion_report.top5,
        champion_report.num_samples,
    )
    assert report.loss == pytest.approx(champion_report.loss, rel=1e-4)
    assert report.logged_to_run is None
    assert report.features.knn_top1 == pytest.approx(champion_report.features.knn_top1)


def test_a_second_test_evaluation_is_refused_with_the_first_result_unless_a_reason_is_given(
    trained_run, champion_report
):
    client = MlflowClient(trained_run.tracking_uri)
    version = trained_run.outcome.model_version
    first = json.loads(client.get_model_version("test-model", version).tags[TEST_EVALUATION_TAG])
    assert first["figures"][m.TEST_TOP1] == pytest.approx(champion_report.top1, abs=1e-3)
    assert first["num_samples"] == TEST_SAMPLES and "reason" not in first and first["time"].endswith("Z")
    run_tags = client.get_run(trained_run.outcome.mlflow_run_id).data.tags  # runs:/ names the same model
    assert json.loads(run_tags[TEST_EVALUATION_TAG]) == first
    for source in (CHAMPION, f"runs:/{trained_run.outcome.mlflow_run_id}/model"):
        with pytest.raises(
            ValueError, match=r"already evaluated on test \(at .*Z: test/top1 [0-9.]+, test/top5"
        ) as caught:
            evaluate_model(trained_run.config, source, log_to_mlflow=False)
        assert "--again --reason" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="--again --reason is for the test split"):
        evaluate_model(trained_run.config, CHAMPION, split="val", again_reason="why not")
    report = evaluate_model(trained_run.config, CHAMPION, log_to_mlflow=False, again_reason="tests: a recorded rerun")
    tags = client.get_model_version("test-model", version).tags
    again = [json.loads(tags[key]) for key in tags if key.startswith(TEST_EVALUATION_TAG + ".")]
    assert "tests: a recorded rerun" in [record.get("reason") for record in again]
    assert report.recorded.startswith(f"models:/test-model/{version} tag {TEST_EVALUATION_TAG}.")


def test_the_test_split_is_logged_as_a_dataset_input_of_the_model_run(trained_run, champion_report):
    run = MlflowClient(trained_run.tracking_uri).get_run(trained_run.outcome.mlflow_run_id)
    contexts = {
        inp.dataset.name: [tag.value for tag in inp.tags if tag.key == "mlflow.data.context"]
        for inp in run.inputs.dataset_inputs
    }
    assert contexts["test"] == ["test"]
    test_manifest = read_manifest(trained_run.shards / "test")
    test_input = next(inp.dataset for inp in run.inputs.dataset_inputs if inp.dataset.name == "test")
    assert test_input.digest == test_manifest.content_hash()
    assert json.loads(test_input.profile)["num_samples"] == TEST_SAMPLES


def test_val_split_is_scored_but_not_logged(trained_run):
    report = evaluate_model(trained_run.config, CHAMPION, split="val")
    assert report.num_samples == 16 and report.split == "val"  # learnable_shards: 4 val images per class
    assert report.logged_to_run is None


def test_run_and_version_uris_name_the_same_model(trained_run, champion_report):
    run_id, version = trained_run.outcome.mlflow_run_id, trained_run.outcome.model_version
    for source in (f"runs:/{run_id}/model", f"models:/test-model/{version}"):
        report = evaluate_model(trained_run.config, source, log_to_mlflow=False, again_reason="tests: same model")
        assert report.top1 == champion_report.top1 and report.logged_to_run is None


def test_mlflow_model_carries_its_class_names(trained_run):
    loaded = load_model_for_inference(CHAMPION, trained_run.config)
    assert loaded.class_names == read_manifest(trained_run.shards / "train").class_names()
    assert (loaded.architecture, loaded.eval_image_size) == ("resnet18", 32)


@pytest.mark.parametrize(
    "source, message",
    [
        ("models:/test-model@no-such-alias", "has no alias 'no-such-alias'"),
        ("models:/no-such-model@champion", "no registered model 'no-such-model'"),
        ("models:/test-model/999", "has no version 999"),
        ("runs:/0123456789abcdef0123456789abcdef/model", "no MLflow run"),
    ],
)
def test_unknown_registry_entries_are_one_line_value_errors(trained_run, source, message):
    with pytest.raises(ValueError, match=message) as caught:
        evaluate_model(trained_run.config, source)
    assert "\n" not in str(caught.value)


def test_missing_checkpoint_directory_is_a_value_error(trained_run, tmp_path):
    with pytest.raises(ValueError, match="not a registered model"):
        evaluate_model(trained_run.config, str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(ValueError, match="needs state.pt and meta.json"):
        evaluate_model(trained_run.config, str(tmp_path))


@pytest.mark.parametrize("source", ["registry", "checkpoint"])
def test_class_count_mismatch_is_refused(trained_run, tmp_path, source):
    write_split(tmp_path / "test", [6], num_classes=3, split="test")
    config = _with(trained_run.config, root=tmp_path)
    model = CHAMPION if source == "registry" else trained_run.outcome.best_checkpoint
    with pytest.raises(ValueError, match="predicts 4 classes but .* has 3"):
        evaluate_model(config, model)


def test_missing_or_unknown_split_is_a_value_error(trained_run, tmp_path):
    with pytest.raises(ValueError, match="no test/manifest.json"):
        evaluate_model(_with(trained_run.config, root=tmp_path), CHAMPION)
    with pytest.raises(ValueError, match="split = 'dev'"):
        evaluate_model(trained_run.config, CHAMPION, split="dev")
