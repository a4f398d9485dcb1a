"""`embed` and `retrieve` (pipeline/cli/retrieval.py): bad input refused in one line before any model is loaded.
Both commands on a trained model are tested in tests/retrieval/test_logged.py."""

from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()


def test_embed_refuses_a_split_that_is_not_one_before_any_work(tmp_path):
    result = runner.invoke(app, ["embed", "--split", "holdout", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: split = 'holdout': choose one of train, val, test"]
    assert not (tmp_path / "out").exists()


def test_retrieve_from_a_folder_that_is_no_embedding_is_one_line(tmp_path):
    query = tmp_path / "query.jpg"
    query.write_bytes(b"")
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    result = runner.invoke(app, ["retrieve", str(query), "--index", str(gallery)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {gallery}: no meta.json; not a complete embedding (run `imagenet-pipeline embed`)"
    ]
