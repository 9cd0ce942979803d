"""distill's data path at scale: bucket-pure shuffled epochs (a pure function of the position, rank-disjoint),
rows read from the shards as training reads them (never every shard at start), and a shard that changes or
goes missing named in one line when it is read."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ladd.config import DistillConfig
from ladd.data import synthetic as synthetic_module
from ladd.data.batches import BucketBatches, Prefetcher
from ladd.data.synthetic import SyntheticSet, load_synthetic
from ladd.distributed import World
from ladd.errors import StaleInput, ValidationFailed
from ladd.tracking import NullTracker


def _buckets(sizes):
    start, out = 0, []
    for n in sizes:
        out.append(np.arange(start, start + n))
        start += n
    return out


def test_every_record_comes_once_an_epoch_in_bucket_pure_batches_by_share():
    buckets = _buckets([37, 100, 3])  # the last bucket is smaller than a batch
    batches = BucketBatches(buckets, batch_size=8, seed=0)
    assert batches.per_epoch == 5 + 13 + 1
    epochs = []
    for epoch in range(3):
        seen, labels = Counter(), []
        for j in range(batches.per_epoch):
            b, records = batches[epoch * batches.per_epoch + j]
            assert len(records) == 8 and set(records) <= set(buckets[b])  # one bucket's records only
            seen.update(records.tolist())
            labels.append(b)
        assert set(seen) == set(range(140))  # every record at least once
        # only the padding of each bucket's last batch repeats: fewer than a batch per bucket
        assert sum(seen.values()) - 140 == (5 * 8 - 37) + (13 * 8 - 100) + (8 - 3)
        assert Counter(labels) == {0: 5, 1: 13, 2: 1}  # buckets by their share of the records
        epochs.append([batches[epoch * batches.per_epoch + j][1].tolist() for j in range(batches.per_epoch)])
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch
    # a pure function of (seed, position): a fresh sampler at any position (mid-epoch, next epoch) agrees
    fresh = BucketBatches(buckets, batch_size=8, seed=0)
    for position in (45, 3, 20, 19, 0):
        assert np.array_equal(fresh[position][1], batches[position][1])
    assert not np.array_equal(BucketBatches(buckets, 8, seed=1)[0][1], batches[0][1])


def test_ranks_read_disjoint_shares_of_each_global_batch():
    batches = BucketBatches(_buckets([64, 64]), batch_size=8, seed=3)
    for position in range(16):
        _, records = batches[position]
        shares = [records[World(rank, 4, rank, torch.device("cpu")).rows(8)] for rank in range(4)]
        assert sorted(np.concatenate(shares).tolist()) == sorted(records.tolist())
        assert len(set(np.concatenate(shares).tolist())) == 8


def test_prefetcher_keeps_order_and_raises_a_reader_error_where_its_batch_is_taken():
    def produce(position):
        if position == 5:
            raise ValidationFailed("shard-00003.safetensors changed")
        return position

    stream = Prefetcher(produce, start=2, depth=2)
    assert [next(stream) for _ in range(3)] == [2, 3, 4]
    with pytest.raises(ValidationFailed, match="shard-00003"):
        next(stream)
    stream.close()


@pytest.fixture(scope="module")
def many_shards(tiny_synthetic, tiny_teacher_dir, prepared_data, tmp_path_factory):
    """The tiny data set in shards of 32 records (37 latent shards; its 50 distinct prompts in 2 of text
    embeddings)."""
    from ladd.synthesize import synthesize

    cfg = replace(tiny_synthetic, out_dir=str(tmp_path_factory.mktemp("many") / "synthetic"), shard_size=32)
    synthesize(cfg, prepared_data, tiny_teacher_dir, NullTracker())
    return Path(cfg.out_dir)


def test_stored_rows_read_back_as_synthesized(many_shards, tiny_synthetic, tiny_teacher_dir):
    """A batch read row by row from the shards equals the whole data set's rows; its embeddings are the teacher's
    own encoding of each record's prompt."""
    from ladd.pipeline import encode_prompts, load_pipeline, max_sequence_length

    whole = load_synthetic(tiny_synthetic.out_dir)
    data = SyntheticSet(many_shards)
    records = np.array([700, 3, 1100, 3, 64])
    batch = data.read(records)
    assert torch.equal(batch["latents"], whole.latents[records])
    assert torch.equal(batch["trajectory"], whole.trajectory[records])
    prompts = list(whole.records["prompt"].iloc[records])
    e, p = encode_prompts(load_pipeline(tiny_teacher_dir), prompts, max_sequence_length(tiny_teacher_dir))
    torch.testing.assert_close(batch["prompt_embeds"], e, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch["pooled_prompt_embeds"], p, rtol=0, atol=1e-6)
    assert batch["seed"].tolist() == whole.records["seed"].iloc[records].tolist()
    assert "trajectory" not in data.read(records, trajectory=False)
    data.close()


def test_distill_start_reads_no_shard_and_a_step_reads_only_its_rows(
    many_shards, tiny_teacher_dir, tmp_path, monkeypatch
):
    opened = []

    class Counting(synthetic_module.ShardFile):
        def __init__(self, path):
            opened.append(Path(path).name)
            super().__init__(path)

    monkeypatch.setattr(synthetic_module, "ShardFile", Counting)
    SyntheticSet(many_shards)
    assert opened == []  # manifest, records columns and a stat per file: no shard opened
    from ladd.distill import distill

    cfg = DistillConfig(
        out_dir=str(tmp_path / "student"),
        checkpoint=str(tmp_path / "ck.safetensors"),
        report_dir=str(tmp_path),
        steps=2,
        batch_size=4,
        warmup_steps=1,
        prefetch=1,
        device="cpu",
    )
    distill(cfg, tiny_teacher_dir, many_shards, NullTracker())
    manifest = json.loads((many_shards / "manifest.json").read_text())
    # 2 steps of 4 records, read ahead by one queued batch and one waiting to be queued: 16 records' shards at
    # most, of 37
    assert len(manifest["shard_files"]) == 37 and len(manifest["embed_files"]) == 2
    latent_shards = {name for name in opened if name.startswith("shard-")}
    assert 0 < len(latent_shards) <= (2 + 1 + 1) * 4 and len(opened) == len(set(opened)), opened  # each opened once


def test_a_changed_or_vanished_shard_is_named_when_read(many_shards, tmp_path):
    copy = tmp_path / "synthetic"
    shutil.copytree(many_shards, copy)
    data = SyntheticSet(copy)
    shard, row = data.columns.iloc[100][["shard", "row"]]
    path = copy / f"shard-{shard:05d}.safetensors"
    blob = bytearray(path.read_bytes())
    spec = synthetic_module.ShardFile(path)
    start = spec.base + spec.specs["latents"]["data_offsets"][0]
    row_bytes = (spec.specs["latents"]["data_offsets"][1] - spec.specs["latents"]["data_offsets"][0]) // 32
    spec.close()
    blob[start + row * row_bytes] ^= 0xFF  # one flipped bit pattern in record 100's latent, same size
    path.write_bytes(bytes(blob))
    data.read(np.array([101 if data.columns.iloc[101]["shard"] != shard else 0]))  # other rows still read
    with pytest.raises(
        ValidationFailed,
        match=rf"the content of shard-{shard:05d}.safetensors no longer matches its "
        rf"checksums in .*records.parquet .*"
        rf"records .*#0 \(shard-{shard:05d}\)",
    ):
        data.read(np.array([5, 100]))
    (copy / "embeds-00001.safetensors").unlink()  # gone after distill started: named when first needed
    prompt = int(np.flatnonzero(data.columns["prompt_index"].to_numpy() // 32 == 1)[0])
    with pytest.raises(FileNotFoundError, match=r"embeds-00001.safetensors disappeared after distill started"):
        data.read(np.array([prompt]))
    data.close()
    with pytest.raises(FileNotFoundError, match=r"embeds-00001.safetensors is missing \(listed in"):
        SyntheticSet(copy)


def test_embeddings_of_another_t5_length_are_refused_before_training(many_shards, tiny_teacher_dir, tmp_path):
    from ladd.distill import distill

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    meta = json.loads((teacher / "ladd.json").read_text())
    (teacher / "ladd.json").write_text(json.dumps({**meta, "max_sequence_length": 4}))
    cfg = DistillConfig(
        out_dir=str(tmp_path / "student"),
        checkpoint=str(tmp_path / "ck.safetensors"),
        report_dir=str(tmp_path),
        steps=2,
        batch_size=4,
        device="cpu",
    )
    with pytest.raises(
        StaleInput,
        match=r"manifest.json: its text embeddings are \[17, 64\] at T5 length 1, the "
        r"teacher's are \[.., 64\] at 4 \(teacher.max_sequence_length\)",
    ):
        distill(cfg, teacher, many_shards, NullTracker())
    assert not (tmp_path / "ck.safetensors").exists()
