"""Single-file exports (ComfyUI/Forge): the student's MMDiT in SD3's original layout and its LoRA in the kohya
layout over it, checked against stock diffusers: its own converter reads them back, `from_single_file` loads the
file offline, and the LoRA merged as ComfyUI merges one equals diffusers' `load_lora_weights` of the adapter."""

import json
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import LDM_UNET_KEY
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers as to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from sd3_family import build_sd35_like_teacher

from ladd import lora
from ladd.config import DistillConfig
from ladd.pipeline import load_pipeline, load_transformer, max_sequence_length, read_meta, write_meta
from ladd.schedules import student_sigmas
from ladd.single_file import (
    LORA_FILE,
    SCHEDULER_FILE,
    TRANSFORMER_FILE,
    original_transformer_state,
    write_single_file_exports,
)


@pytest.fixture(scope="module")
def tiny_exports(tiny_student_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("single_file") / "exports"
    return out, write_single_file_exports(tiny_student_dir, out)


@pytest.fixture(scope="module")
def sd35_lora_student(tmp_path_factory):
    """An SD3.5-medium-shaped teacher (dual attention, qk norm, a context_pre_only last block) and a LoRA student
    folder of it: random nonzero adapters on every attention, feed-forward and adaLN linear, alpha != rank,
    saved by ladd's own save_adapter."""
    root = tmp_path_factory.mktemp("sd35")
    teacher = build_sd35_like_teacher(root / "teacher", words=["handwritten", "six"])
    student = shutil.copytree(teacher, root / "student")
    cfg = DistillConfig(student="lora", lora_rank=2, lora_alpha=6.0)
    targets = ("attention", "feed_forward", "adaln")
    spec = lora.LoraSpec.resolve(
        teacher, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, "distill.lora_targets"
    )
    transformer = load_transformer(teacher)
    weights, _ = lora.add_student_adapter(transformer, spec)
    with torch.no_grad():
        for p in weights.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    adapter = {
        k: v.detach().clone().contiguous()
        for k, v in get_peft_model_state_dict(transformer, adapter_name=lora.ADAPTER).items()
    }
    lora.save_adapter(student, adapter, spec)
    write_meta(
        student,
        max_sequence_length=12,
        student_times=[1.0, 0.6, 0.35, 0.2],
        schedule="beta",
        sampler="euler",
        default_steps=2,
        base_model=str(teacher),
    )
    return teacher, student


def _inputs(config, n=2):
    g = torch.Generator().manual_seed(3)
    side = config.sample_size
    return dict(
        hidden_states=torch.randn(n, config.in_channels, side, side, generator=g),
        encoder_hidden_states=torch.randn(n, 5, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(n, config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([900.0, 350.0][:n]),
    )


@torch.no_grad()
def _forward(transformer, config):
    return transformer.eval()(**_inputs(config)).sample


def test_diffusers_converter_reads_the_original_layout_back_exactly(tiny_student_dir, sd35_lora_student):
    for folder in (tiny_student_dir, sd35_lora_student[1]):
        transformer = load_transformer(folder)
        state = transformer.state_dict()
        original = original_transformer_state(state, transformer.config)
        assert original and all(k.startswith(LDM_UNET_KEY) for k in original)
        back = to_diffusers(dict(original))  # it pops from what it is given
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state), folder
    # the SD3.5 shape has what the converter must be told about: attn2 blocks, qk norm, a context_pre_only block
    assert {"joint_blocks.0.x_block.attn2.qkv.weight", "joint_blocks.2.x_block.attn.ln_q.weight"} <= {
        k.removeprefix(LDM_UNET_KEY) for k in original
    }
    assert not any(k.startswith(f"{LDM_UNET_KEY}joint_blocks.2.context_block.mlp") for k in original)


def test_single_file_loads_offline_and_samples_as_the_folder(tiny_student_dir, tiny_exports):
    out, written = tiny_exports
    assert sorted(p.name for p in out.iterdir()) == sorted(written) == sorted([TRANSFORMER_FILE, SCHEDULER_FILE])
    folder = load_transformer(tiny_student_dir)
    stored = load_file(str(tiny_student_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    exported = load_file(str(out / TRANSFORMER_FILE))
    assert len(exported) <= len(stored) and {v.dtype for v in exported.values()} == {v.dtype for v in stored.values()}
    single = SD3Transformer2DModel.from_single_file(
        str(out / TRANSFORMER_FILE), config=str(tiny_student_dir), subfolder="transformer", local_files_only=True
    )
    assert (_forward(single, folder.config) - _forward(folder, folder.config)).abs().max() < 1e-6
    # a few-step sample with the student's own scheduler, the single-file transformer in its place
    meta = read_meta(tiny_student_dir)
    latents = []
    for transformer in (None, single):
        pipe = load_pipeline(tiny_student_dir, **({"transformer": transformer} if transformer else {}))
        torch.manual_seed(0)  # the re-noising sampler draws from the global RNG
        latents.append(
            pipe(
                "handwritten six",
                num_inference_steps=meta["default_steps"],
                guidance_scale=0.0,
                max_sequence_length=max_sequence_length(tiny_student_dir),
                output_type="latent",
                generator=torch.Generator().manual_seed(1),
            ).images
        )
    assert (latents[0] - latents[1]).abs().max() < 1e-6


def test_scheduler_json_holds_what_samples_like_the_student(tiny_student_dir, tiny_exports):
    settings = json.loads((tiny_exports[0] / SCHEDULER_FILE).read_text())
    meta = read_meta(tiny_student_dir)
    steps = meta["default_steps"]
    assert settings["steps"] == steps and settings["trained_times"] == meta["student_times"]
    assert settings["sampler"] == meta["sampler"] and settings["stochastic_sampling"] == (meta["sampler"] == "renoise")
    assert settings["sigma_schedule"] == meta["schedule"] and settings["sigma_min"] == min(meta["student_times"])
    assert settings["guidance_scale"] == 0.0 and settings["max_sequence_length"] == max_sequence_length(
        tiny_student_dir
    )
    assert settings["shift"] == 1.0 and settings["sigmas"] == student_sigmas(steps, meta).tolist()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(settings["scheduler_config"])
    for k in settings["trained_steps"]:  # each visits training times only
        scheduler.set_timesteps(k)
        assert set(scheduler.sigmas[:-1].tolist()) <= set(meta["student_times"]), k
    scheduler.set_timesteps(steps)
    assert torch.equal(scheduler.sigmas, student_sigmas(steps, meta))


def _comfy_merge(original: dict, kohya: dict) -> dict:
    """A kohya LoRA applied as ComfyUI applies one to a single-file model: its key map names each weight
    `lora_unet_<key, no prefix or .weight, dots as _>`; the weight gains alpha / rank * up @ down."""
    merged, used = dict(original), set()
    for key, weight in original.items():
        name = "lora_unet_" + key.removeprefix(LDM_UNET_KEY).removesuffix(".weight").replace(".", "_")
        if f"{name}.lora_up.weight" in kohya:
            up, down, alpha = (kohya[f"{name}.{p}"] for p in ("lora_up.weight", "lora_down.weight", "alpha"))
            merged[key] = weight + float(alpha) / len(down) * up @ down
            used |= {f"{name}.{p}" for p in ("lora_up.weight", "lora_down.weight", "alpha")}
    assert used == set(kohya), set(kohya) - used  # ComfyUI warns "lora key not loaded" for any other
    return merged


def test_original_layout_lora_applies_as_the_diffusers_adapter(sd35_lora_student, tmp_path):
    teacher, student = sd35_lora_student
    written = write_single_file_exports(student, tmp_path)
    assert set(written) == {TRANSFORMER_FILE, LORA_FILE, SCHEDULER_FILE}
    kohya = load_file(str(tmp_path / LORA_FILE))
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert kohya[f"{qkv}.lora_down.weight"].shape[0] == 6 and float(kohya[f"{qkv}.alpha"]) == 18.0  # 3 x rank 2, 6/2
    assert float(kohya["lora_unet_joint_blocks_0_x_block_attn_proj.alpha"]) == 6.0
    # the reference: stock diffusers loads the diffusers-layout adapter onto the teacher
    pipe = load_pipeline(teacher)
    config = pipe.transformer.config
    base = _forward(pipe.transformer, config)
    original = original_transformer_state(pipe.transformer.state_dict(), config)
    pipe.load_lora_weights(str(student))
    reference = _forward(pipe.transformer, config)
    assert (reference - base).abs().max() > 1e-3  # the adapter matters
    merged = SD3Transformer2DModel.from_config(config)
    merged.load_state_dict(to_diffusers(_comfy_merge(original, kohya)))
    assert (_forward(merged, config) - reference).abs().max() < 1e-5
    # stock diffusers 0.42 has no reader for non-diffusers SD3 LoRAs: it finds no transformer keys and changes
    # nothing (a later one that reads the layout must apply it exactly)
    pipe = load_pipeline(teacher)
    pipe.load_lora_weights(str(tmp_path), weight_name=LORA_FILE)
    after = _forward(pipe.transformer, config)
    assert (after - base).abs().max() < 1e-6 or (after - reference).abs().max() < 1e-5
