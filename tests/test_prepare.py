import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ladd.config import PrepareConfig
from ladd.data.prepare import DIGIT_WORDS, _prompt_table, load_split, prepare, read_table
from ladd.errors import DataError


def test_digits_splits(prepared_data):
    train, val, test = (load_split(prepared_data / name) for name in ("train", "val", "test"))
    assert len(train.captions) + len(val.captions) + len(test.captions) == 1797
    assert abs(len(test.captions) / 1797 - 0.2) < 0.01 and abs(len(val.captions) / 1797 - 0.15) < 0.01
    assert train.images.shape[1:] == val.images.shape[1:] == (1, 32, 32) and train.images.dtype == torch.uint8
    ids = [set(s.captions["id"]) for s in (train, val, test)]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    assert sorted(train.labels.unique().tolist()) == list(range(10))
    for prompt, label in zip(train.captions["prompt"], train.captions["label"]):
        assert DIGIT_WORDS[label] in prompt or str(label) in prompt


def test_prepare_is_deterministic(tmp_path, prepared_data):
    prepare(PrepareConfig(out_dir=str(tmp_path / "again")))
    a, b = load_split(prepared_data / "test"), load_split(tmp_path / "again" / "test")
    pd.testing.assert_frame_equal(a.captions, b.captions)
    assert torch.equal(a.images, b.images)


def _image_folder(tmp_path, n=6):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i in range(n):
        Image.fromarray(np.full((20, 24, 3), i * 40, dtype=np.uint8)).save(images / f"{i}.png")
        rows.append({"file": f"{i}.png", "caption": f"a grey square number {i}", "label": i % 2})
    return images, rows


def test_folder_source_with_csv(tmp_path):
    images, rows = _image_folder(tmp_path)
    pd.DataFrame(rows).to_csv(tmp_path / "captions.csv", index=False)
    cfg = PrepareConfig(
        source="folder",
        images_dir=str(images),
        captions=str(tmp_path / "captions.csv"),
        resolution=16,
        test_fraction=0.34,
        out_dir=str(tmp_path / "out"),
    )
    summary = prepare(cfg)
    assert summary["train"] + summary["val"] + summary["test"] == 6
    train = load_split(tmp_path / "out" / "train")
    assert train.images.shape[1:] == (3, 16, 16)
    assert train.captions["prompt"].str.startswith("a grey square").all()


def test_folder_bad_image_names_record_and_keeps_previous_output(tmp_path):
    images, rows = _image_folder(tmp_path)
    (images / "3.png").write_bytes(b"not a png")
    pd.DataFrame(rows).to_parquet(tmp_path / "captions.parquet")
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("keep me")
    cfg = PrepareConfig(
        source="folder", images_dir=str(images), captions=str(tmp_path / "captions.parquet"), out_dir=str(out)
    )
    with pytest.raises(ValueError, match=r"captions.parquet row 3 .*3\.png"):
        prepare(cfg)
    assert [p.name for p in out.iterdir()] == ["previous.txt"]


def test_prompts_only_table(tmp_path):
    pd.DataFrame({"prompt": [f"prompt {i}" for i in range(10)]}).to_csv(tmp_path / "p.csv", index=False)
    prepare(PrepareConfig(source="prompts", captions=str(tmp_path / "p.csv"), out_dir=str(tmp_path / "out")))
    train = load_split(tmp_path / "out" / "train")
    assert train.images is None and len(train.captions) == 6  # 2 test, 2 val
    assert (train.labels == -1).all()


def test_table_without_text_column(tmp_path):
    pd.DataFrame({"text": ["x"]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(ValueError, match=r"p.csv: needs a 'prompt' or 'caption' column"):
        prepare(PrepareConfig(source="prompts", captions=str(tmp_path / "p.csv"), out_dir=str(tmp_path / "out")))


@pytest.mark.parametrize(
    "name, encoding, data",
    [
        ("p.csv", "auto", "\ufeffprompt\nun caf\u00e9\n".encode("utf-8")),  # UTF-8 with a byte-order mark
        ("p.csv", "auto", "prompt\nun caf\u00e9\n".encode("utf-16")),  # UTF-16 starts with its byte-order mark
        ("P.CSV", "auto", "prompt\nun caf\u00e9\n".encode("utf-8")),  # the suffix in capitals
        ("p.csv", "latin-1", "prompt\nun caf\u00e9\n".encode("latin-1")),  # named in prepare.encoding
    ],
)
def test_tables_in_other_encodings_and_suffixes(tmp_path, name, encoding, data):
    (tmp_path / name).write_bytes(data)
    table = read_table(tmp_path / name, encoding)
    assert list(table.columns) == ["prompt"] and table["prompt"].tolist() == ["un caf\u00e9"]


def test_ids_and_labels_keep_their_text_and_values(tmp_path):
    (tmp_path / "p.csv").write_text("id,prompt,label\n007,seven,7\n010,ten,1.0\n")
    table = _prompt_table(read_table(tmp_path / "p.csv"), "p.csv")
    assert table["id"].tolist() == ["007", "010"] and table["label"].tolist() == [7, 1]


def test_a_prompt_never_sits_in_two_splits(tmp_path):
    """A user's table with duplicated prompts is split by distinct prompt: every copy of one lands in one split, and
    the test split is the one drawn before val existed (val_fraction 0 gives the same test records)."""
    rng = np.random.default_rng(0)
    distinct = [f"a photo of thing {i}" for i in range(40)]
    prompts = [distinct[i] for i in rng.integers(0, 40, 300)]  # 300 rows, each prompt about 7 times
    pd.DataFrame({"prompt": prompts}).to_csv(tmp_path / "prompts.csv", index=False)
    cfg = PrepareConfig(source="prompts", captions=str(tmp_path / "prompts.csv"), out_dir=str(tmp_path / "out"))
    summary = prepare(cfg)
    splits = {name: set(load_split(tmp_path / "out" / name).captions["prompt"]) for name in ("train", "val", "test")}
    assert summary["train"] + summary["val"] + summary["test"] == 300
    assert not (splits["train"] & splits["val"] or splits["train"] & splits["test"] or splits["val"] & splits["test"])
    assert (len(splits["test"]), len(splits["val"])) == (8, 6)  # 0.2 and 0.15 of the 40 distinct prompts
    prepare(
        PrepareConfig(
            source="prompts", captions=str(tmp_path / "prompts.csv"), out_dir=str(tmp_path / "no_val"), val_fraction=0.0
        )
    )
    assert not (tmp_path / "no_val" / "val").exists()
    assert set(load_split(tmp_path / "no_val" / "test").captions["prompt"]) == splits["test"]


def test_too_few_prompts_for_three_splits_is_one_line(tmp_path):
    pd.DataFrame({"prompt": ["a cat", "a dog", "a cat"]}).to_csv(tmp_path / "prompts.csv", index=False)
    with pytest.raises(DataError, match=r"^prepare: 2 distinct prompts cannot fill train, val \(0.15\) and test"):
        prepare(PrepareConfig(source="prompts", captions=str(tmp_path / "prompts.csv"), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()
