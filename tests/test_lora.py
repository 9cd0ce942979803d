"""LoRA students: peft adapters on the teacher's own weights (one copy of the base serves student and teacher),
saved fused and as an adapter that stock diffusers loads onto the teacher."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from safetensors import safe_open

from ladd import lora
from ladd.config import DistillConfig
from ladd.distill import distill, memory_plan
from ladd.distributed import init_world
from ladd.errors import ConfigError
from ladd.networks import build_networks
from ladd.pipeline import load_transformer, max_sequence_length, read_meta
from ladd.tracking import NullTracker

SMOKE = dict(steps=6, batch_size=8, warmup_steps=2, checkpoint_every=100, log_every=1, device="cpu")
LORA = dict(student="lora", lora_rank=4, lr_g=1e-3)


def _networks(teacher_dir, checkpointing="off", teacher=None):
    cfg = DistillConfig(**LORA, device="cpu", gradient_checkpointing=checkpointing)
    world = init_world("cpu")
    teacher = load_transformer(teacher_dir).eval().requires_grad_(False) if teacher is None else teacher
    spec = lora.LoraSpec.resolve(
        teacher_dir, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, "distill.lora_targets"
    )
    torch.manual_seed(0)
    return teacher, build_networks(cfg, teacher_dir, teacher, memory_plan(cfg, world.device), world, spec)


def _inputs(teacher, n=2):
    g = torch.Generator().manual_seed(3)
    c = teacher.config
    side = c.sample_size
    return (
        torch.randn(n, c.in_channels, side, side, generator=g),
        torch.rand(n, generator=g) * 0.9 + 0.05,
        torch.randn(n, 8, c.joint_attention_dim, generator=g),
        torch.randn(n, c.pooled_projection_dim, generator=g),
    )


def test_lora_settings_are_checked_before_any_model_loads(tiny_teacher_dir, tiny_synthetic, tmp_path):
    with pytest.raises(ConfigError, match="distill.lora_rank must be >= 1, got 0"):
        DistillConfig(student="lora", lora_rank=0)
    with pytest.raises(ConfigError, match="distill.student: lora does not combine with distill.parallel: fsdp"):
        DistillConfig(student="lora", parallel="fsdp")
    with pytest.raises(ConfigError, match="distill.student must be one of"):
        DistillConfig(student="half")
    preset = DistillConfig(preset="lora")  # the measured LoRA recipe: params.yaml's, with adapters and their lr
    assert (preset.student, preset.lr_g, preset.lora_targets) == ("lora", 1e-3, ("attention", "feed_forward", "adaln"))
    with pytest.raises(ConfigError, match="distill.lora_dropout"):
        DistillConfig(student="lora", lora_dropout=1.0)
    cfg = DistillConfig(
        out_dir=str(tmp_path / "student"),
        checkpoint=str(tmp_path / "ck" / "distill.safetensors"),
        report_dir=str(tmp_path / "ck"),
        lora_targets=("attention", "attn.to_nothing"),
        **LORA,
        **SMOKE,
    )
    with pytest.raises(ConfigError, match="distill.lora_targets: 'attn.to_nothing' matches no linear layer"):
        distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())
    assert not any(tmp_path.iterdir())


def test_one_copy_of_the_base_weights_serves_student_and_teacher(tiny_teacher_dir):
    teacher = load_transformer(tiny_teacher_dir).eval().requires_grad_(False)
    storage = sorted(p.data_ptr() for p in teacher.parameters())
    teacher, nets = _networks(tiny_teacher_dir, teacher=teacher)
    student, trained, layers, ema, disc, opt_g = (
        nets.student,
        nets.trained,
        nets.adapter_layers,
        nets.ema,
        nets.disc,
        nets.opt_g,
    )
    assert student is teacher and len(layers) > 0
    # the base weights are still the teacher's own tensors (same storage, nothing copied), frozen
    base = [p for n, p in teacher.named_parameters() if ".lora_" not in n]
    assert sorted(p.data_ptr() for p in base) == storage and not any(p.requires_grad for p in base)
    # only the adapters train, and the EMA holds them alone
    adapters = {id(p) for n, p in teacher.named_parameters() if ".lora_" in n}
    assert {id(p) for p in trained.parameters()} == adapters
    assert {id(p) for g in opt_g.param_groups for p in g["params"]} == adapters
    linear = [(n, m) for n, m in load_transformer(tiny_teacher_dir).named_modules() if isinstance(m, torch.nn.Linear)]
    suffixes = lora.check_targets(tiny_teacher_dir, DistillConfig().lora_targets)  # attention, feed-forward, adaLN
    targeted = [m for n, m in linear if any(n.endswith("." + s) for s in suffixes)]
    assert lora.count(trained) == sum(LORA["lora_rank"] * (m.in_features + m.out_features) for m in targeted) > 0
    assert lora.count(ema) == lora.count(trained)
    # training the adapters leaves the teacher's features (adapters off) bit for bit as they were
    x, t, c, p = _inputs(teacher)
    before = [f.clone() for f in disc.features(x, t, c, p)]
    teacher_v = teacher(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t * 1000).sample
    for _ in range(3):
        with lora.adapters(layers, on=True):
            v = student(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t * 1000).sample
        opt_g.zero_grad()
        v.pow(2).mean().backward()
        opt_g.step()
    assert all(torch.equal(a, b) for a, b in zip(before, disc.features(x, t, c, p)))
    assert all(p.grad is None for p in base)
    with lora.adapters(layers, on=True):
        v = student(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t * 1000).sample
    assert (v - teacher_v).abs().max() > 1e-3  # the student moved


def _adversarial_grads(teacher_dir, checkpointing: str, stock_checkpointing=False) -> list[torch.Tensor]:
    """The adapters' gradient of one student pass judged through the teacher's features (both on one module)."""
    teacher, nets = _networks(teacher_dir, checkpointing)
    student, trained, layers, disc = nets.student, nets.trained, nets.adapter_layers, nets.disc
    if stock_checkpointing:
        student.enable_gradient_checkpointing()  # diffusers' own: recomputes with whatever adapters are on in backward
    with torch.no_grad():  # adapters that change the output, so a pass recomputed without them would differ
        for q in trained.parameters():
            q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel())) * 0.2)
    x, t, c, p = _inputs(teacher)
    with lora.adapters(layers, on=True):
        v = student(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t * 1000).sample
    x0_hat = x - t.view(-1, 1, 1, 1) * v
    loss = sum(h.mean() for h in disc.heads_logits(disc.features(x0_hat, t, c, p), t, p))
    loss.backward()
    return [q.grad.clone() for q in trained.parameters()]


def test_gradient_checkpointing_recomputes_each_pass_with_its_own_adapters(tiny_teacher_dir):
    reference = _adversarial_grads(tiny_teacher_dir, "off")
    checkpointed = _adversarial_grads(tiny_teacher_dir, "student")
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(checkpointed, reference)) < 1e-4
    # the check can fail: stock checkpointing recomputes the student's blocks with the adapters off
    try:
        stock = _adversarial_grads(tiny_teacher_dir, "student", stock_checkpointing=True)
    except torch.utils.checkpoint.CheckpointError:  # torch notices the recomputation saved other tensors
        return
    assert max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(stock, reference)) > 1e-2


def _latents(pipe, steps: int, msl: int) -> torch.Tensor:
    torch.manual_seed(0)  # the re-noising sampler draws from the global RNG
    return pipe(
        "handwritten six",
        num_inference_steps=steps,
        guidance_scale=0.0,
        max_sequence_length=msl,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
    ).images


def test_lora_student_is_fused_and_its_adapter_loads_in_stock_diffusers(tiny_teacher_dir, tiny_synthetic, tmp_path):
    ck = tmp_path / "ck.safetensors"
    cfg = DistillConfig(
        out_dir=str(tmp_path / "student"), checkpoint=str(ck), report_dir=str(tmp_path), ema_decay=0.5, **LORA, **SMOKE
    )
    summary = distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())
    student_dir = tmp_path / "student"
    meta = read_meta(student_dir)
    assert meta["lora"]["rank"] == 4 and summary["trained_parameters"] == meta["lora"]["parameters"]
    with safe_open(str(ck), "pt") as f:  # the checkpoint holds the adapters, never the base weights
        student_keys = [k for k in f.keys() if k.startswith(("student.", "ema."))]
        n = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in student_keys)
    assert student_keys and all("lora_" in k for k in student_keys) and n == 2 * summary["trained_parameters"]
    no_t5 = dict(text_encoder_3=None, tokenizer_3=None)
    fused = StableDiffusion3Pipeline.from_pretrained(student_dir, **no_t5)
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_teacher_dir, **no_t5)
    stock.load_lora_weights(student_dir)
    stock.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(student_dir, subfolder="scheduler")
    msl = max_sequence_length(student_dir)
    teacher = StableDiffusion3Pipeline.from_pretrained(tiny_teacher_dir, **no_t5)
    teacher.scheduler = stock.scheduler
    for steps in (1, 2, 4):
        a, b = _latents(fused, steps, msl), _latents(stock, steps, msl)
        assert (a - b).abs().max() <= 1e-5, steps
        assert (a - _latents(teacher, steps, msl)).abs().max() > 1e-3  # the adapter changes the samples
    card = (student_dir / "README.md").read_text()
    assert "load_lora_weights" in card and 'subfolder="scheduler"' in card


def test_lora_checkpoint_resumes_to_the_same_adapter(tiny_teacher_dir, tiny_synthetic, tmp_path):
    def run(name, steps, checkpoint):
        cfg = DistillConfig(
            out_dir=str(tmp_path / name),
            checkpoint=str(tmp_path / checkpoint),
            report_dir=str(tmp_path / f"{checkpoint}_reports"),
            **LORA,
            **{**SMOKE, "steps": steps, "checkpoint_every": 3},
        )
        return distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())

    run("straight", 6, "a.safetensors")
    run("first", 3, "b.safetensors")
    assert run("resumed", 6, "b.safetensors")["resumed_from"] == 3

    def adapter(name):
        with safe_open(str(tmp_path / name / "pytorch_lora_weights.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    a, b = adapter("straight"), adapter("resumed")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.allclose(a[k], adapter("first")[k]) for k in a)


def test_lora_on_a_bf16_base_with_checkpointing_tracks_the_fp32_run(tiny_teacher_dir, tiny_synthetic, tmp_path):
    """The memory habits of a large teacher: a bf16 base (the teacher's own dtype), bf16 autocast and gradient
    checkpointing of the shared module. The adapters stay fp32 and move as in the fp32 run, up to bf16 rounding."""

    def run(name, **memory):
        cfg = DistillConfig(
            out_dir=str(tmp_path / name),
            checkpoint=str(tmp_path / f"{name}.safetensors"),
            report_dir=str(tmp_path / f"{name}_reports"),
            **LORA,
            **SMOKE,
            **memory,
        )
        distill(cfg, tiny_teacher_dir, tiny_synthetic.out_dir, NullTracker())
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith("student.")}

    fp32 = run("fp32", teacher_dtype="float32", mixed_precision="no", gradient_checkpointing="off")
    bf16 = run("bf16", teacher_dtype="bfloat16", mixed_precision="bf16", gradient_checkpointing="all")
    assert fp32.keys() == bf16.keys() and all(v.dtype == torch.float32 for v in bf16.values())
    update = [k for k in fp32 if "lora_B" in k]  # B starts at zero: its value is the whole update
    diff = sum((bf16[k] - fp32[k]).pow(2).sum() for k in update).sqrt()
    size = sum(fp32[k].pow(2).sum() for k in update).sqrt()
    print(f"bf16 vs fp32 adapter update: relative difference {float(diff / size):.3f}")
    assert size > 0 and torch.isfinite(diff) and diff / size < 0.25, float(diff / size)
