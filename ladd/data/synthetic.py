"""Reading the synthetic data set that `ladd synthesize` writes (its layout is documented there) without holding
it: `SyntheticSet` opens the manifest and the few records-table columns a reader needs, checks that every listed
shard is there at its recorded size (a `stat`, no read), and reads the rows a batch asks for with `pread`, so host
memory is O(batch) whatever the number of records, and no shard is read in full. What is read is checked as it
is read: a shard's header against the run the manifest describes (when it is first opened), each record's bytes
against its CRC-32 in records.parquet, and the latents for finiteness. Every failure names the file and the
record. `load_synthetic` reads a small set whole (tests, and the synthetic suite shard by shard)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from ladd.errors import StaleInput, ValidationFailed
from ladd.pipeline import native_resolution

# a record's tensors (a text-to-image set has no condition, a set without path states no trajectory) and its
# prompt's; records.parquet holds a CRC-32 of each row of each, `crc_<tensor>`
RECORD_TENSORS = ("latents", "trajectory", "condition")
PROMPT_TENSORS = ("prompt_embeds", "pooled_prompt_embeds")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
READ_COLUMNS = ["bucket", "shard", "row", "seed", "prompt_index", *(f"crc_{n}" for n in PROMPT_TENSORS)]


def bucket_resolutions(cfg, teacher_dir: str | Path) -> list[tuple[int, int]]:
    """The (H, W) buckets a SynthesizeConfig asks for: `resolutions`, else the teacher's native size."""
    return [tuple(r) for r in cfg.resolutions] if cfg.resolutions else [native_resolution(teacher_dir)]


def synthesis_settings(cfg, resolutions: list[tuple[int, int]]) -> dict:
    """The `synthesize` settings a data set was made with, as its manifest stores them under `run` (beside the
    teacher's and the prompts' fingerprints); `cfg` is a SynthesizeConfig, `resolutions` its resolved buckets."""
    run = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "device", "batch_size")}
    return json.loads(json.dumps({**run, "resolutions": [list(r) for r in resolutions]}))


def check_settings(out_dir: str | Path, settings: dict) -> None:
    """StaleInput (exit 4) when the data set in `out_dir` was made with other `synthesize` settings than these
    (params.yaml edited, synthesize not rerun): training on it would silently use the old ones."""
    manifest_path = Path(out_dir) / "manifest.json"
    if not manifest_path.is_file():
        return  # SyntheticSet names what is missing
    made = json.loads(manifest_path.read_text())["run"]
    changed = [f"{k}: {made.get(k)} -> {v}" for k, v in settings.items() if made.get(k) != v]
    if changed:
        raise StaleInput(
            f"{out_dir} was made with other synthesize settings than params.yaml's ({'; '.join(changed)}): "
            "run `ladd synthesize` first"
        )


def row_checksums(tensor: torch.Tensor) -> list[int]:
    """CRC-32 of each row's bytes: what a reader checks the row against (records.parquet's `crc_<tensor>`)."""
    rows = tensor.contiguous().view(len(tensor), -1).view(torch.uint8).numpy()
    return [zlib.crc32(r) for r in rows]


class ShardFile:
    """One safetensors file read row by row with `pread` (no mmap: only the rows asked for enter this process's
    memory). Its header (tensor layouts and metadata) is parsed once, on opening."""

    def __init__(self, path: Path):
        self.path, self.fd = path, os.open(path, os.O_RDONLY)
        try:
            (size,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, size, 8))
        except (struct.error, ValueError, OSError):
            os.close(self.fd)
            raise ValidationFailed(
                f"{path} is not a readable safetensors file (torn or foreign): rerun `ladd synthesize`"
            ) from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.base, self.specs = 8 + size, header

    def has(self, name: str) -> bool:
        return name in self.specs

    def read_rows(self, name: str, rows: np.ndarray) -> tuple[torch.Tensor, list[memoryview]]:
        """Rows `rows` of tensor `name` (in that order) and each row's bytes, for its checksum."""
        spec = self.specs[name]
        shape, dtype = spec["shape"], _SAFETENSORS_DTYPES[spec["dtype"]]
        start, end = spec["data_offsets"]
        row_bytes = (end - start) // shape[0]
        buf = bytearray(len(rows) * row_bytes)
        view = memoryview(buf)
        parts = [view[i * row_bytes : (i + 1) * row_bytes] for i in range(len(rows))]
        for part, r in zip(parts, rows.tolist()):
            if os.preadv(self.fd, [part], self.base + start + r * row_bytes) != row_bytes:
                raise ValidationFailed(
                    f"{self.path} ends before row {r} of {name}: it was truncated after synthesize "
                    "wrote it; rerun `ladd synthesize`"
                )
        tensor = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return tensor.view(len(rows), *shape[1:]), parts

    def close(self) -> None:
        os.close(self.fd)


def gather_rows(shard_of, files: np.ndarray, rows: np.ndarray, names: list[str], check=None) -> dict:
    """Rows (files[i], rows[i]), in that order, of each named tensor the shards hold: each file's rows read
    together from `shard_of(file)` (an open ShardFile); `check(file name, tensor, positions, row bytes)` may refuse
    them."""
    out: dict[str, list] = {}
    for f in np.unique(files):
        picked = np.flatnonzero(files == f)
        shard = shard_of(int(f))
        for tensor in names:
            if shard.has(tensor):
                values, parts = shard.read_rows(tensor, rows[picked])
                if check is not None:
                    check(shard.path.name, tensor, picked, parts)
                out.setdefault(tensor, []).append((picked, values))
    result = {}
    for tensor, pieces in out.items():  # back into the asked order
        order = np.concatenate([p for p, _ in pieces])
        result[tensor] = torch.cat([v for _, v in pieces])[torch.from_numpy(np.argsort(order))]
    return result


@dataclass(frozen=True)
class BucketSpec:
    """One resolution bucket: its pixel size, latent shape [C, h, w], and the indices of its records."""

    resolution: tuple[int, int]
    latent_shape: tuple[int, ...]
    records: np.ndarray


class SyntheticSet:
    """The synthetic data set, open for reading by batch (one reader thread at a time). Fails clearly, naming the
    file, on an unfinished, damaged or mixed directory; a shard that changes or disappears later fails when read."""

    def __init__(self, out_dir: str | Path, max_open: int = 64):
        self.out = Path(out_dir)
        self.manifest_path = self.out / "manifest.json"
        if not self.manifest_path.is_file():
            raise FileNotFoundError(f"{self.manifest_path} is missing: run (or finish) `ladd synthesize` first")
        self.manifest = manifest = json.loads(self.manifest_path.read_text())
        if "embed_files" not in manifest:
            raise StaleInput(
                f"{self.out} was written by an older ladd (no stored text embeddings): rerun `ladd synthesize`"
            )
        listed = [
            ("records.parquet", None),
            *zip(manifest["shard_files"], manifest["shard_bytes"]),
            *zip(manifest["embed_files"], manifest["embed_bytes"]),
        ]
        for name, size in listed:  # a stat per file: nothing is read
            path = self.out / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (listed in {self.manifest_path}): rerun `ladd synthesize`")
            if size is not None and path.stat().st_size != size:
                raise ValidationFailed(
                    f"{self.out}: the content of {name} no longer matches what {self.manifest_path} "
                    f"lists ({path.stat().st_size} bytes, written as {size}: changed after "
                    "synthesize wrote it): delete it and rerun `ladd synthesize`"
                )
        self.run_fp = json.dumps(manifest["run"], sort_keys=True)
        stored = [f"crc_{n}" for n in RECORD_TENSORS if n in manifest["record_tensors"]]
        columns = pd.read_parquet(self.out / "records.parquet", columns=READ_COLUMNS + stored)
        # 4 bytes where 4 hold them (CRC-32s, shard and row numbers): the one table held whole, 36 B a record
        self.columns = columns.astype(
            {
                **{c: "int32" for c in ("bucket", "shard", "row", "prompt_index")},
                **{c: "uint32" for c in columns if c.startswith("crc_")},
            }
        )
        if len(self.columns) != manifest["records"]:
            raise ValidationFailed(
                f"{self.out}: {self.out / 'records.parquet'} holds {len(self.columns)} records, "
                f"{self.manifest_path} says {manifest['records']}"
            )
        self.arrays = {name: self.columns[name].to_numpy() for name in self.columns}  # what a batch indexes
        bucket = self.arrays["bucket"]
        self.buckets = [
            BucketSpec(tuple(b["resolution"]), tuple(b["latent_shape"]), np.flatnonzero(bucket == i))
            for i, b in enumerate(manifest["buckets"])
        ]
        self.trajectory_times: list[float] = manifest.get("trajectory_times", [])
        self.text = manifest["text"]
        self._open: OrderedDict[str, ShardFile] = OrderedDict()
        self.max_open = max_open

    def __len__(self) -> int:
        return len(self.columns)

    def _file(self, name: str) -> ShardFile:
        """An open shard (at most `max_open` at once), its header checked against the manifest's run on opening."""
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        path = self.out / name
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} disappeared after distill started (listed in {self.manifest_path}): "
                "restore it (`dvc checkout`) or rerun `ladd synthesize`; the checkpoint is kept"
            )
        shard = ShardFile(path)
        if shard.metadata.get("run") != self.run_fp:
            shard.close()
            raise ValidationFailed(
                f"{self.out}: {name} was not written by the run {self.manifest_path} describes "
                "(other settings, or not readable): rerun `ladd synthesize`"
            )
        self._open[name] = shard
        if len(self._open) > self.max_open:
            self._open.popitem(last=False)[1].close()
        return shard

    def describe(self, records) -> str:
        """How errors name records: `id#sample (shard-00001)`, read from records.parquet only when needed."""
        table = pd.read_parquet(self.out / "records.parquet", columns=["id", "sample", "shard"]).iloc[list(records)[:5]]
        return ", ".join(f"{r.id}#{r.sample} (shard-{r.shard:05d})" for r in table.itertuples())

    def _read(self, files: np.ndarray, rows: np.ndarray, sums: dict, what: str, who) -> dict:
        """`gather_rows` from this set's open shards, each row checked against `sums` (tensor name -> CRC-32 per
        row); `who(positions)` gives the records to name on a mismatch."""

        def check(name, tensor, picked, parts):
            bad = picked[np.array([zlib.crc32(p) for p in parts], dtype=np.int64) != sums[tensor][picked]]
            if len(bad):
                raise ValidationFailed(
                    f"{self.out}: the content of {name} no longer matches its checksums in "
                    f"{self.out / 'records.parquet'} (changed after synthesize wrote it; e.g. "
                    f"records {self.describe(who(bad))}): delete it and rerun `ladd synthesize`"
                )

        return gather_rows(lambda f: self._file(self.manifest[f"{what}_files"][f]), files, rows, list(sums), check)

    def read(self, records: np.ndarray, trajectory: bool = True) -> dict:
        """The records' tensors in their stored dtype (a GPU run moves bf16 and casts there), from their shards:
        `latents` [n, C, h, w], `trajectory` [n, K, C, h, w]
        (with `trajectory`, where stored), `condition` [n, 1 + C, h, w] (inpainting), `prompt_embeds` [n, L, D],
        `pooled_prompt_embeds` [n, P] (each distinct prompt read once), `seed` [n]. ValidationFailed naming the
        records whose bytes changed or whose latents are not finite."""
        records = np.asarray(records)
        cols = {name: values[records] for name, values in self.arrays.items()}
        names = [n for n in RECORD_TENSORS if f"crc_{n}" in cols and (trajectory or n != "trajectory")]
        batch = self._read(
            cols["shard"], cols["row"], {n: cols[f"crc_{n}"] for n in names}, "shard", lambda bad: records[bad]
        )
        finite = torch.isfinite(batch["latents"].float().flatten(1)).all(1)
        if "trajectory" in batch:
            finite &= torch.isfinite(batch["trajectory"].float().flatten(1)).all(1)
        if not finite.all():
            bad = records[(~finite).numpy()]
            raise ValidationFailed(
                f"{self.out}: {len(bad)} synthetic latents are not finite, e.g. records "
                f"{self.describe(bad)}: rerun `ladd synthesize` (delete those shards)"
            )
        prompts, first, inverse = np.unique(cols["prompt_index"], return_index=True, return_inverse=True)
        per = self.manifest["embed_shard_size"]
        text = self._read(
            prompts // per,
            prompts % per,
            {n: cols[f"crc_{n}"][first] for n in PROMPT_TENSORS},
            "embed",
            lambda bad: records[first[bad]],
        )
        batch.update({k: v[torch.from_numpy(inverse)] for k, v in text.items()})
        batch["seed"] = torch.from_numpy(cols["seed"])
        return batch

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


@dataclass
class Bucket:
    """The records of one resolution, whole: their indices, teacher latents x0 [n, C, h, w], (when synthesized)
    the path states [n, K, C, h, w] and (inpainting) the condition [n, 1 + C, h, w]."""

    resolution: tuple[int, int]
    records: torch.Tensor
    latents: torch.Tensor
    trajectory: torch.Tensor | None
    condition: torch.Tensor | None = None


@dataclass
class Synthetic:
    records: pd.DataFrame
    buckets: list[Bucket]
    trajectory_times: list[float]

    @property
    def latents(self) -> torch.Tensor:
        """[N, C, h, w] in record order (single-resolution data)."""
        if len(self.buckets) != 1:
            raise ValueError(f"the synthetic data holds {len(self.buckets)} resolution buckets: read .buckets")
        return self.buckets[0].latents

    @property
    def trajectory(self) -> torch.Tensor | None:
        return self.buckets[0].trajectory


def shard_fingerprint(path: Path) -> str | None:
    """The run fingerprint a shard was written under (None for a torn or foreign file)."""
    try:
        shard = ShardFile(path)
    except (ValidationFailed, OSError):
        return None
    shard.close()
    return shard.metadata.get("run")


def iter_shards(out_dir: str | Path):
    """(bucket index, that shard's tensors whole) for each latent shard in turn: one shard in memory at a time."""
    data = SyntheticSet(out_dir)
    for name, b in zip(data.manifest["shard_files"], data.manifest["shard_buckets"]):
        data._file(name)  # its header checked against the run
        yield b, load_file(data.out / name)
    data.close()


def load_synthetic(out_dir: str | Path) -> Synthetic:
    """The whole data set in memory, by bucket, each shard read once: for small sets and tests (distill streams)."""
    data = SyntheticSet(out_dir)
    records = pd.read_parquet(data.out / "records.parquet")
    shards = list(iter_shards(out_dir))
    buckets = []
    for b, spec in enumerate(data.buckets):
        mine = [s for sb, s in shards if sb == b]
        buckets.append(
            Bucket(
                spec.resolution,
                torch.cat([s["record"] for s in mine]),
                torch.cat([s["latents"].float() for s in mine]),
                torch.cat([s["trajectory"].float() for s in mine]) if data.trajectory_times else None,
                torch.cat([s["condition"].float() for s in mine]) if "condition" in mine[0] else None,
            )
        )
    return Synthetic(records, buckets, data.trajectory_times)
