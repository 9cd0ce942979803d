"""`ladd teacher`: the embedded-default teacher, a real tiny `StableDiffusion3Pipeline` trained here
(AutoencoderKL + SD3Transformer2DModel with the rectified-flow objective), or any SD3-family pipeline
given as `teacher.pretrained` (copied as is, no training). Either way models/teacher/ is a diffusers
folder that `ladd.pipeline.load_pipeline` reads."""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from ladd.config import TeacherConfig
from ladd.data.prepare import load_split, prompt_vocabulary
from ladd.inpaint import has_condition, inpaint_condition, record_masks, widen_transformer
from ladd.io import atomic_dir
from ladd.pipeline import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    encode_images,
    encode_prompts,
    load_pipeline,
    max_sequence_length,
    pick_device,
    write_meta,
)
from ladd.tokenizer import write_clip_tokenizer
from ladd.training import adamw, update_ema, warmup_cosine

log = logging.getLogger(__name__)


def _text_encoder(tokenizer, hidden: int, max_length: int, seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


def t5_slot_length(cfg: TeacherConfig) -> int:
    """The T5 slot's length the teacher trains and samples with: `max_sequence_length`; else the tiny teacher's 1
    (it has no T5, so every slot position holds the same zero vector: one carries what 16 do, and 16 made every
    transformer pass 1.5x slower); else a ladd-made folder's own (its ladd.json), else diffusers' default 256."""
    if cfg.max_sequence_length:
        return cfg.max_sequence_length
    if not cfg.pretrained:
        return 1
    return max_sequence_length(cfg.pretrained) if Path(cfg.pretrained).is_dir() else DEFAULT_MAX_SEQUENCE_LENGTH


def build_tiny_pipeline(
    cfg: TeacherConfig, channels: int, resolution: int, words: list[str]
) -> StableDiffusion3Pipeline:
    """Untrained tiny SD3 pipeline: two frozen random CLIP text encoders (their features are fixed
    codes the MMDiT learns to read), a VAE for `channels`x`resolution`^2 images, an MMDiT, a scheduler."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_clip_tokenizer(Path(tmp), words, cfg.text_max_length)
    h = cfg.text_hidden_size
    down = len(cfg.vae_channels) - 1
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=resolution,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    inner = cfg.num_heads * cfg.head_dim
    latent_size = resolution // 2**down
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=cfg.patch_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.num_heads,
        joint_attention_dim=2 * h,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * h,
        pos_embed_max_size=latent_size // cfg.patch_size,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=cfg.shift),
        vae=vae,
        text_encoder=_text_encoder(tokenizer, h, cfg.text_max_length, cfg.seed + 1),
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, h, cfg.text_max_length, cfg.seed + 2),
        tokenizer_2=copy.deepcopy(tokenizer),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def train_vae(vae: AutoencoderKL, images: torch.Tensor, cfg: TeacherConfig, device, tracker) -> None:
    """Reconstruction (MSE) + a small KL term; then set SD3's latent shift/scale from the data so the
    scaled latents the MMDiT sees have zero mean and unit variance."""
    vae.to(device).train()
    opt = adamw(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    for step in (bar := tqdm(range(cfg.vae_steps), desc="vae", mininterval=2)):
        idx = torch.randint(len(images), (cfg.vae_batch_size,), generator=gen)
        x = images[idx].to(device, torch.float32) / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = mse + cfg.vae_kl_weight * kl
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * warmup_cosine(step, cfg.vae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            tracker.log_metrics({"vae/mse": mse.item(), "vae/kl": kl.item()}, step=step)
            bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval().requires_grad_(False)
    latents = encode_images(vae, images)
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())


def train_transformer(
    transformer: SD3Transformer2DModel,
    latents,
    embeds,
    pooled,
    null_embeds,
    null_pooled,
    cfg: TeacherConfig,
    device,
    tracker,
    condition: torch.Tensor | None = None,
) -> SD3Transformer2DModel:
    """Rectified flow (Esser et al. 2024): x_t = (1-t) x0 + t eps, regress v = eps - x0 with
    t ~ LogitNormal(m, s); captions dropped to the empty prompt with prob. p so CFG works. `condition`
    (per record, e.g. inpainting's mask and masked-image latent) is concatenated to x_t on channels. Returns the EMA."""
    transformer.to(device).train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = adamw(transformer.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    latents, embeds, pooled = latents.to(device), embeds.to(device), pooled.to(device)
    condition = condition.to(device) if condition is not None else None
    null_embeds, null_pooled = null_embeds.to(device), null_pooled.to(device)
    for step in (bar := tqdm(range(cfg.steps), desc="teacher", mininterval=2)):
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen).to(device)
        x0, c, p = latents[idx], embeds[idx], pooled[idx]
        drop = (torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout).to(device)
        c = torch.where(drop[:, None, None], null_embeds, c)
        p = torch.where(drop[:, None], null_pooled, p)
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(cfg.batch_size, generator=gen)).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * eps
        if condition is not None:
            x_t = torch.cat([x_t, condition[idx]], 1)
        v = transformer(hidden_states=x_t, encoder_hidden_states=c, pooled_projections=p, timestep=t * 1000).sample
        loss = F.mse_loss(v, eps - x0)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        update_ema(ema, transformer, cfg.ema_decay if step >= 100 else 0.0)
        if step % 25 == 0 or step == cfg.steps - 1:
            tracker.log_metrics({"teacher/loss": loss.item()}, step=step)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema


def pretrain_tiny_teacher(cfg: TeacherConfig, data_dir: str | Path, device, tracker) -> StableDiffusion3Pipeline:
    train = load_split(Path(data_dir) / "train")
    if train.images is None:
        raise ValueError(f"{data_dir}/train has no images: a prompts-only data set needs teacher.pretrained")
    words = prompt_vocabulary() + sorted({w for p in train.captions["prompt"] for w in p.lower().split()})
    pipe = build_tiny_pipeline(cfg, train.images.shape[1], train.images.shape[-1], words)
    timings = {}
    start = time.perf_counter()
    train_vae(pipe.vae, train.images, cfg, device, tracker)
    timings["vae_s"] = time.perf_counter() - start
    pipe.to(device)
    latents = encode_images(pipe.vae, train.images)
    msl = t5_slot_length(cfg)
    embeds, pooled = encode_prompts(pipe, list(train.captions["prompt"]), msl)
    null_embeds, null_pooled = encode_prompts(pipe, [""], msl)
    start = time.perf_counter()
    pipe.transformer = train_transformer(
        pipe.transformer, latents, embeds, pooled, null_embeds, null_pooled, cfg, device, tracker
    )
    timings["transformer_s"] = time.perf_counter() - start
    tracker.log_metrics({f"teacher/{k}": v for k, v in timings.items()})
    log.info("teacher pretraining: vae %.1f s, transformer %.1f s", timings["vae_s"], timings["transformer_s"])
    return pipe.to("cpu")


def teacher_stage(cfg: TeacherConfig, data_dir: str | Path, device: str, tracker, inpaint=None) -> Path:
    """Write models/teacher/ atomically: a copy of `cfg.pretrained`, or the pretrained tiny teacher; with
    `inpaint.enabled`, an inpainting teacher (a 33-channel `pretrained` as it is, else widened and fine-tuned)."""
    device = pick_device(device)
    if cfg.pretrained:
        log.info("teacher: loading %s (no pretraining)", cfg.pretrained)
        pipe = load_pipeline(cfg.pretrained)
    else:
        pipe = pretrain_tiny_teacher(cfg, data_dir, device, tracker)
    if inpaint is not None and inpaint.enabled:
        pipe = _inpainting_teacher(pipe, cfg, inpaint, data_dir, device, tracker)
    with atomic_dir(cfg.out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        msl = t5_slot_length(cfg)
        write_meta(tmp, max_sequence_length=msl, source=cfg.pretrained or "tiny")
    log.info(
        "teacher: T5 slot of %d tokens (%s)",
        msl,
        "teacher.max_sequence_length"
        if cfg.max_sequence_length
        else "the tiny teacher's"
        if not cfg.pretrained
        else "the folder's ladd.json, else diffusers' default",
    )
    tracker.log_params(
        {"teacher.resolved.source": cfg.pretrained or "tiny", "teacher.resolved.max_sequence_length": msl}
    )
    return Path(cfg.out_dir)


def _inpainting_teacher(pipe, cfg: TeacherConfig, inpaint, data_dir, device, tracker):
    from dataclasses import replace

    from ladd.errors import ConfigError

    c, latent = pipe.transformer.config.in_channels, pipe.vae.config.latent_channels
    if has_condition(c, latent):
        log.info("teacher: %s is an inpainting model already (%d input channels)", cfg.pretrained, c)
        return pipe
    if c != latent:
        raise ConfigError(
            f"teacher.pretrained: {cfg.pretrained}'s transformer takes {c} input channels; an inpainting "
            f"teacher needs {latent} (text-to-image, widened here) or {2 * latent + 1}"
        )
    train = load_split(Path(data_dir) / "train")
    if train.images is None:
        raise ConfigError(
            f"inpaint.enabled: fine-tuning an inpainting teacher needs images, and {data_dir}/train has "
            "none: give a 33-channel inpainting teacher.pretrained"
        )
    tuned = replace(cfg, steps=inpaint.teacher_steps, lr=inpaint.teacher_lr)
    return finetune_inpaint_teacher(
        pipe.to(device),
        train.images,
        list(train.captions["prompt"]),
        tuned,
        device,
        tracker,
        inpaint.masks_per_image,
        inpaint.mask_seed,
    ).to("cpu")


def finetune_inpaint_teacher(
    pipe, images: torch.Tensor, prompts: list[str], cfg, device, tracker, masks_per_image: int = 2, seed: int = 0
):
    """The base teacher widened to the inpainting layout (`widen_transformer`: it starts as the base model) and
    fine-tuned with rectified flow on the data, each image under `masks_per_image` seeded random masks.
    `cfg`: the TeacherConfig (steps, batch size, lr... of this fine-tune). Returns the pipeline with the EMA."""
    n, _, height, width = images.shape
    masks = record_masks("teacher", range(n * masks_per_image), seed, height, width)
    repeated = images.repeat(masks_per_image, 1, 1, 1)
    latents = encode_images(pipe.vae, images).cpu().repeat(masks_per_image, 1, 1, 1)
    cond = inpaint_condition(pipe.vae, repeated, masks)
    msl = t5_slot_length(cfg)
    embeds, pooled = encode_prompts(pipe, list(prompts) * masks_per_image, msl)
    null_embeds, null_pooled = encode_prompts(pipe, [""], msl)
    wide = widen_transformer(pipe.transformer)
    pipe.transformer = train_transformer(
        wide, latents, embeds, pooled, null_embeds, null_pooled, cfg, device, tracker, condition=cond
    )
    return pipe
