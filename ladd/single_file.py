"""Single-file exports for ComfyUI/Forge users: the student's MMDiT in SD3's original (Stability) key layout, as
single-file SD3/SD3.5 checkpoints have it, its LoRA (if any) in the kohya/sd-scripts layout over those keys, and
the sampling settings that reproduce the student.

diffusers only converts original -> diffusers (`convert_sd3_transformer_checkpoint_to_diffusers`). The inverse is
read off that converter: it runs on a made-up original checkpoint whose every row says which key and row it is,
so each diffusers tensor tells where its rows came from; real tensors are then only sliced and concatenated back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch

from ladd.io import atomic_file, save_tensors, write_json
from ladd.pipeline import LADD_META, max_sequence_length, read_meta
from ladd.schedules import student_sigmas, trained_step_counts

TRANSFORMER_FILE, LORA_FILE, SCHEDULER_FILE = "transformer_sd3.safetensors", "lora_sd3.safetensors", "scheduler.json"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # what ladd.lora.save_adapter writes (diffusers' layout)


class _Probe(dict):
    """An original-layout checkpoint that makes up each tensor the converter asks for: row i of key number k is
    (k, i); `rows` gives a key's row count (default 12: the converter's chunk(3)/chunk(2) split it evenly)."""

    def __init__(self, hints: list[str], rows: dict[str, int]):
        super().__init__(dict.fromkeys(hints))
        self.asked, self.rows = [], rows

    def _make(self, key: str) -> torch.Tensor:
        self.asked.append(key)
        n = self.rows.get(key, 12)
        return torch.stack([torch.full((n,), len(self.asked) - 1), torch.arange(n)], 1)

    def __missing__(self, key):  # checkpoint[key] (it reads a shape): keep the tensor for the pop that follows
        self[key] = self._make(key)
        return self[key]

    def pop(self, key, *_):
        return super().pop(key) if key in self else self._make(key)


def row_sources(config: Mapping) -> dict[str, tuple[str, torch.Tensor]]:
    """diffusers key of an SD3Transformer2DModel with `config` -> (original key, the original's rows (dim 0) that
    the diffusers tensor holds, in its order). Probes are (rows, 2) int64: no weights are made."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers as to_diffusers

    with torch.device("meta"):
        sizes = {k: v.shape[0] for k, v in SD3Transformer2DModel.from_config(dict(config)).state_dict().items()}
    # The converter finds the block count, the dual-attention (attn2) blocks and qk norm by scanning the keys it is
    # given, before it asks for any tensor: keys that say just that, from the config, stand in for a checkpoint's.
    hints = [
        f"joint_blocks.{config['num_layers'] - 1}.",
        *(f"joint_blocks.{i}.attn2." for i in config.get("dual_attention_layers") or ()),
        *(["ln_q"] if config.get("qk_norm") else []),
    ]
    first = _Probe(hints, {})  # which original key feeds each diffusers tensor, and what share of its rows
    original_rows: dict[str, float] = {}
    for key, probe in to_diffusers(first).items():
        for k in probe[:, 0].unique().tolist():
            name = first.asked[k]
            share = int((probe[:, 0] == k).sum()) / len(probe)
            original_rows[name] = original_rows.get(name, 0) + sizes.get(key, 0) * share
    second = _Probe(hints, {k: int(n) for k, n in original_rows.items()})  # now at the model's real row counts
    sources = {}
    for key, probe in to_diffusers(second).items():
        if key not in sizes or len(probe) != sizes[key] or probe[:, 0].unique().numel() != 1:
            raise ValueError(
                f"diffusers' SD3 converter made {key} ({len(probe)} rows) not from rows of one original "
                "tensor: its inverse cannot be read off it"
            )
        sources[key] = (second.asked[int(probe[0, 0])], probe[:, 1])
    if set(sources) != set(sizes):
        raise ValueError(f"diffusers' SD3 converter gives {sorted(set(sources) ^ set(sizes))[:5]} unlike the model")
    for name, parts in _by_original(sources).items():
        if sorted(torch.cat([rows for _, rows in parts]).tolist()) != list(range(second.rows[name])):
            raise ValueError(f"diffusers' SD3 converter does not use each row of {name} once: no exact inverse")
    return sources


def _by_original(sources: dict) -> dict[str, list[tuple[str, torch.Tensor]]]:
    groups: dict[str, list] = {}
    for key, (name, rows) in sources.items():
        groups.setdefault(name, []).append((key, rows))
    return groups


def original_transformer_state(state_dict: Mapping, config: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers SD3Transformer2DModel state (tensors, or any mapping that loads each on access) in SD3's
    original layout under `model.diffusion_model.`, as single-file SD3/SD3.5 checkpoints have it (diffusers'
    converter strips that prefix; ComfyUI's loaders detect it). One copy: each tensor is read once."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY

    sources = row_sources(config)
    if set(state_dict) != set(sources):
        raise ValueError(
            f"not the state of an SD3Transformer2DModel with this config: {sorted(set(state_dict) ^ set(sources))[:5]}"
        )
    out = {}
    for name, parts in _by_original(sources).items():
        n = sum(len(rows) for _, rows in parts)
        tensors = [(state_dict[key], rows) for key, rows in parts]
        if len(parts) == 1 and torch.equal(parts[0][1], torch.arange(n)):
            out[LDM_UNET_KEY + name] = tensors[0][0]
            continue
        whole = tensors[0][0].new_empty((n, *tensors[0][0].shape[1:]))
        for tensor, rows in tensors:
            whole[rows] = tensor
        out[LDM_UNET_KEY + name] = whole
    return out


def original_lora_state(
    diffusers_lora_state: Mapping, metadata: Mapping | None, config: Mapping
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A diffusers-layout SD3 transformer LoRA (`transformer.<module>.lora_A/B.weight`; `metadata` its LoRA
    config as `lora_state_dict(..., return_lora_metadata=True)` gives it) -> the kohya/sd-scripts layout over SD3's
    original keys (`lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down/lora_up.weight`, `.alpha`), which ComfyUI
    and Forge load. LoRAs on modules that share one original tensor (q, k, v -> qkv) become one LoRA of the summed
    rank: A stacked, B block-diagonal over the module's rows, so B·A is the diffusers one exactly; alpha is set so
    that alpha / rank stays the diffusers scale."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    prefix = f"{StableDiffusion3Pipeline.transformer_name}."
    meta = {k.removeprefix(prefix): v for k, v in (metadata or {}).items()}
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise ValueError("LoRAs with per-module ranks or alphas (rank_pattern/alpha_pattern) are not converted")
    keys = list(diffusers_lora_state)
    if not all(k.startswith(prefix) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        raise ValueError("only a transformer's plain LoRA (transformer.*.lora_A/lora_B.weight) converts")
    sources = row_sources(config)
    modules = dict.fromkeys(k.removeprefix(prefix).rpartition(".lora_")[0] for k in keys)
    groups = _by_original({module: sources[module + ".weight"] for module in modules})
    sizes = {name: sum(len(r) for _, r in parts) for name, parts in _by_original(sources).items()}
    peft = {}
    for name, parts in groups.items():
        down = [diffusers_lora_state[f"{prefix}{m}.lora_A.weight"] for m, _ in parts]
        up = down[0].new_zeros((sizes[name], sum(len(a) for a in down)))
        start = 0
        for (module, rows), a in zip(parts, down):
            up[rows, start : start + len(a)] = diffusers_lora_state[f"{prefix}{module}.lora_B.weight"]
            start += len(a)
        base = name.removesuffix(".weight")  # under `unet.`: diffusers' kohya renaming makes that lora_unet_
        peft[f"unet.{base}.lora_A.weight"], peft[f"unet.{base}.lora_B.weight"] = torch.cat(down), up
    # diffusers' PEFT -> kohya renaming; its alphas are the ranks (scale 1): rescaled to the adapter's own scale
    # (peft's lora_alpha / r; without metadata diffusers loads alpha = rank)
    scale = float(meta["lora_alpha"]) / float(meta["r"]) if "lora_alpha" in meta else 1.0
    kohya = convert_state_dict_to_kohya(peft)
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(float(kohya[key]) * scale, dtype=torch.float32)
    return kohya, {"format": "pt", "ladd_lora_config": json.dumps(meta)}


class _LazyTensors(Mapping):
    """The tensors of safetensors files, each read from disk when asked for (never the whole model at once)."""

    def __init__(self, files, stack: ExitStack):
        from safetensors import safe_open

        self.handles = {}
        for f in files:
            handle = stack.enter_context(safe_open(str(f), framework="pt"))
            self.handles.update(dict.fromkeys(handle.keys(), handle))

    def __getitem__(self, key):
        return self.handles[key].get_tensor(key)

    def __iter__(self):
        return iter(self.handles)

    def __len__(self):
        return len(self.handles)


def _transformer_files(folder: Path) -> list[Path]:
    from diffusers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFETENSORS_WEIGHTS_NAME

    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {SAFETENSORS_WEIGHTS_NAME} (nor a sharded index)")
    return [folder / SAFETENSORS_WEIGHTS_NAME]


def sampling_settings(student_dir: str | Path) -> dict:
    """What a user of the single files sets to sample as the student does."""
    meta = read_meta(student_dir)
    if "student_times" not in meta:
        raise ValueError(f"{student_dir} is not a ladd student: its {LADD_META} has no student_times")
    scheduler = json.loads((Path(student_dir) / "scheduler" / "scheduler_config.json").read_text())
    steps, times = int(meta.get("default_steps", 4)), meta["student_times"]
    sampler = meta.get("sampler", "euler")
    stochastic = bool(scheduler.get("stochastic_sampling", sampler == "renoise"))
    return {
        "steps": steps,
        "trained_steps": trained_step_counts(meta),
        "trained_times": times,  # counts visiting training times only
        "sampler": sampler,
        "stochastic_sampling": stochastic,
        # ComfyUI: lcm is x0 then fresh noise to the next sigma for flow models (= re-noising)
        "comfyui_sampler": "lcm" if stochastic else "euler",
        "sigma_schedule": meta.get("schedule", "exponential"),
        "sigma_min": min(times),
        "sigmas": student_sigmas(steps, meta).tolist(),
        "shift": scheduler.get("shift", 1.0),
        "guidance_scale": 0.0,
        "comfyui_cfg": 1.0,  # no classifier-free guidance: one pass per step
        "max_sequence_length": max_sequence_length(student_dir),
        "base_model": meta.get("base_model"),
        # what lora_sd3 goes on: an aligned student's DPO adapter on the distilled student, a LoRA student's on
        # its teacher
        "lora_base": "the distilled student it was aligned from" if "aligned" in meta else meta.get("base_model"),
        "scheduler_config": scheduler,
    }


def write_single_file_exports(student_dir: str | Path, out_dir: str | Path) -> dict[str, int]:
    """Write `transformer_sd3.safetensors` (dtype as stored), `lora_sd3.safetensors` (a LoRA student's adapter)
    and `scheduler.json` into `out_dir`, each atomically; returns {file name: size in bytes}."""
    from diffusers import SD3Transformer2DModel

    student_dir, out_dir = Path(student_dir), Path(out_dir)
    settings = sampling_settings(student_dir)  # first: a folder that is no ladd student fails before any write
    config = SD3Transformer2DModel.load_config(str(student_dir), subfolder="transformer")
    meta = {"format": "pt", "ladd": json.dumps(read_meta(student_dir), sort_keys=True)}
    with ExitStack() as stack:
        state = original_transformer_state(_LazyTensors(_transformer_files(student_dir / "transformer"), stack), config)
        with atomic_file(out_dir / TRANSFORMER_FILE) as tmp:
            save_tensors({k: v.contiguous() for k, v in state.items()}, tmp, meta)
        del state
    written = [TRANSFORMER_FILE]
    if (student_dir / ADAPTER_FILE).is_file():
        from diffusers import StableDiffusion3Pipeline

        adapter, adapter_meta = StableDiffusion3Pipeline.lora_state_dict(
            str(student_dir), weight_name=ADAPTER_FILE, return_lora_metadata=True
        )
        lora, lora_meta = original_lora_state(adapter, adapter_meta, config)
        with atomic_file(out_dir / LORA_FILE) as tmp:
            save_tensors(lora, tmp, lora_meta)
        written.append(LORA_FILE)
    write_json(out_dir / SCHEDULER_FILE, settings)
    return {name: (out_dir / name).stat().st_size for name in [*written, SCHEDULER_FILE]}
