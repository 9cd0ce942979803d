"""Typed, frozen per-stage configs: one dataclass per section of params.yaml, each checking its own values.
`ladd.params` reads a params file into them (types, paths, settings that contradict each other or the data).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ladd.errors import ConfigError
from ladd.presets import DISTILL_PRESETS

# the keys of ladd.schedules.STUDENT_SCHEDULES (a test keeps them equal): config stays free of the schedule math,
# so editing the student's schedule leaves the stages before distill up to date
STUDENT_SCHEDULE_NAMES = ("exponential", "beta")


def must_exist(default=None):
    """A path field that must exist on disk when it is set."""
    return field(default=default, metadata={"must_exist": True})


@dataclass(frozen=True)
class PrepareConfig:
    source: str = "digits"  # digits | folder | prompts
    resolution: int = 32
    test_fraction: float = 0.2  # held out for the figures reported
    val_fraction: float = 0.15  # held out for choosing settings (evaluate.split: val); 0: no val split
    seed: int = 0
    images_dir: str | None = must_exist()  # source=folder: image files named in the captions table
    captions: str | None = must_exist()  # source=folder|prompts: csv or parquet table
    encoding: str = "auto"  # csv text: auto (UTF-8, or UTF-8/16/32 by its byte-order mark) | a Python codec name
    max_image_pixels: int = 40_000_000  # larger images are refused before decoding (a 40 MP RGB is ~0.5 GB of floats)
    out_dir: str = "data/prepared"

    def __post_init__(self):
        _choice("prepare.source", self.source, ("digits", "folder", "prompts"))
        if self.source == "folder" and not (self.images_dir and self.captions):
            raise ConfigError("prepare.source=folder needs prepare.images_dir and prepare.captions")
        if self.source == "prompts" and not self.captions:
            raise ConfigError("prepare.source=prompts needs prepare.captions (a prompts table)")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"prepare.test_fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 <= self.val_fraction < 1 or self.test_fraction + self.val_fraction >= 1:
            raise ConfigError(
                f"prepare.val_fraction must be in [0, 1) and leave a train split beside test_fraction "
                f"{self.test_fraction}, got {self.val_fraction}"
            )
        if self.encoding != "auto":
            import codecs

            try:
                codecs.lookup(self.encoding)
            except LookupError:
                raise ConfigError(
                    f"prepare.encoding: {self.encoding!r} is not a text encoding Python knows "
                    "(auto, utf-8, latin-1, cp1252, utf-16...)"
                ) from None
        if self.max_image_pixels < 1:
            raise ConfigError(f"prepare.max_image_pixels must be positive, got {self.max_image_pixels}")


@dataclass(frozen=True)
class ValidateConfig:
    report_dir: str = "reports/validation"
    classes: int = 10  # every one of 0..classes-1 must appear in train (0: no class check)
    max_prompt_length: int = 300
    max_duplicate_share: float = 0.99  # templated digit prompts repeat by design; lower it for real captions
    latent_tolerance: float = 0.5  # synthetic per-channel mean within ±tol, std within ×(1±tol) of real latents


@dataclass(frozen=True)
class ClassifierConfig:
    steps: int = 800
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    device: str = "auto"
    out_dir: str = "models/classifier"


@dataclass(frozen=True)
class TeacherConfig:
    pretrained: str | None = None  # local dir or hub id of any SD3-family pipeline; skips pretraining
    out_dir: str = "models/teacher"
    max_sequence_length: int | None = (
        None  # T5 slot length; None: 1 for the tiny teacher (no T5), else ladd.json's, else 256
    )
    # tiny embedded teacher
    text_hidden_size: int = 32
    text_max_length: int = 16
    vae_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4  # SD3's own layout is 16 (what diffusers' inpaint pipeline needs: 16 + 1 + 16 = 33)
    vae_steps: int = 600
    vae_batch_size: int = 16  # 32: reconstruction MSE 0.0008 against 0.0009, in twice the time
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    num_layers: int = 4
    num_heads: int = 2
    head_dim: int = 32
    patch_size: int = 2
    shift: float = 1.0
    steps: int = 1500
    batch_size: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0
    device: str = "auto"


@dataclass(frozen=True)
class SynthesizeConfig:
    out_dir: str = "data/synthetic"
    guidance: float = 2.0
    steps: int = 28
    samples_per_prompt: int = 4
    shard_size: int = 1024
    batch_size: int = 256
    trajectory_times: tuple[float, ...] = (
        0.7934400439,
        0.4565599561,
        0.25,
    )  # teacher path states stored for trajectory distillation
    resolutions: tuple[tuple[int, ...], ...] | None = (
        None  # [height, width] pixel buckets; None: the teacher's native size
    )
    resolution_weights: tuple[float, ...] | None = None  # share of the records per bucket (None: equal)
    storage_dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on the CPU) | float32 | bfloat16 | float16
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        for i, size in enumerate(self.resolutions or ()):
            if len(size) != 2 or min(size) < 1:
                raise ConfigError(f"synthesize.resolutions[{i}] must be [height, width] in pixels, got {list(size)}")
        if self.resolution_weights is not None:
            n = len(self.resolutions or ((0, 0),))
            if len(self.resolution_weights) != n or min(self.resolution_weights) <= 0:
                raise ConfigError(
                    f"synthesize.resolution_weights must be {n} positive numbers (one per resolution), "
                    f"got {list(self.resolution_weights)}"
                )
        _choice("synthesize.storage_dtype", self.storage_dtype, ("auto", "float32", "bfloat16", "float16"))
        if not all(0 < t < 1 for t in self.trajectory_times):
            raise ConfigError(f"synthesize.trajectory_times must lie in (0, 1), got {list(self.trajectory_times)}")
        _positive(
            "synthesize",
            steps=self.steps,
            samples_per_prompt=self.samples_per_prompt,
            shard_size=self.shard_size,
            batch_size=self.batch_size,
        )


@dataclass(frozen=True)
class DistillConfig:
    out_dir: str = "models/student"
    checkpoint: str = "models/checkpoints/distill.safetensors"  # the resume point: no DVC output (never pushed)
    report_dir: str = "reports"  # distill.json (how the run went) and distill_curve.csv/.png: small, kept in git
    preset: str | None = None  # a key of DISTILL_PRESETS; its settings replace those it names
    steps: int = 500
    batch_size: int = 64
    # the times `schedule` gives from 1 to t_min (ladd/schedules.py): stock diffusers then visits trained times
    # at 1, 2 and n steps
    student_times: tuple[float, ...] = (1.0, 0.7934400439, 0.4565599561, 0.25)
    schedule: str = "beta"  # beta (nearer evenly spaced; diffusers needs scipy) | exponential (geometric times)
    warmup_steps: int = 100
    warmup_probs: tuple[float, ...] = (0.0, 0.0, 0.5, 0.5)
    probs: tuple[float, ...] = (0.7, 0.1, 0.1, 0.1)
    student_input: str = (
        "trajectory"  # noised (teacher latent + fresh noise: LADD) | trajectory (teacher's path states)
    )
    backward_share: float = 0.0  # share of t < 1 inputs made by the student's own earlier steps (DMD2)
    renoise_times: str = (
        "logit_normal"  # discriminator times: logit_normal (LADD) | tied (t < 1: below the student's t)
    )
    renoise_mean: float = -0.25  # t_hat ~ LogitNormal(m, s) before the discriminator (LADD: m = 1, s = 1)
    renoise_std: float = 1.0
    independent_renoise: bool = False  # draw t_hat separately for real and fake
    adversarial_weight: float = 1.0  # the student's adversarial loss (LADD: 1; 0: regression only)
    adversarial_time_weights: tuple[float, ...] | None = None  # a factor per student time (None: 1 at each)
    regression_weight: float = 30.0  # MSE of x0_hat to regression_target on t < 1 inputs (LADD: 0)
    regression_weight_one: float = 10.0  # the same at t = 1 (with trajectory inputs: noise -> its teacher latent)
    regression_target: str = "endpoint"  # endpoint (the latent the input came from) | teacher (teacher's x0 prediction)
    feature_layers: tuple[int, ...] | None = (
        -2,
        -1,
    )  # teacher blocks with a head (negative: from the top); None: 4 spread
    head_channels: int = 64
    loss: str = "hinge"  # hinge | nonsaturating
    d_steps_per_g: int = 1
    lr_g: float = 3e-5
    lr_d: float = 1e-3
    betas: tuple[float, ...] = (0.0, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.996
    r1_weight: float = 0.0  # approximate R1 on the real branch
    r1_sigma: float = 0.01
    sampler: str = "renoise"  # few-step sampling of the student: renoise (ADD/LADD) | euler
    checkpoint_every: int = 100
    log_every: int = 10
    prefetch: int | None = None  # batches read ahead of the loop by a background thread; None: 4 on CUDA, 0 on the CPU
    # memory habits of a 2-8B teacher ("auto": on for CUDA, off on the CPU)
    gradient_checkpointing: str = "auto"  # auto | off | student | all (student and the frozen teacher's forward)
    mixed_precision: str = "auto"  # auto | no | bf16: autocast of the forward passes; student weights stay fp32
    teacher_dtype: str = "auto"  # auto | float32 | bfloat16: the frozen teacher's weights
    ema_on_cpu: bool = False  # keep the EMA copy in CPU memory (updated from the device every step)
    truncate_teacher: bool = True  # skip the teacher's blocks above the deepest hooked one
    parallel: str = "ddp"  # none | ddp | fsdp: how the student spans launch.nproc_per_node x nnodes processes
    student: str = "full"  # full (every weight trains) | lora (peft adapters on the teacher's own weights)
    lora_rank: int = 64
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_dropout: float = 0.0
    # groups of ladd/lora.py or module-name suffixes; attention alone left FD@4 1.22x full's here
    # (docs/results/students.md)
    lora_targets: tuple[str, ...] = ("attention", "feed_forward", "adaln")
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.preset is not None:
            _choice("distill.preset", self.preset, tuple(DISTILL_PRESETS))
            for key, value in DISTILL_PRESETS[self.preset].items():
                object.__setattr__(self, key, value)
        _choice("distill.loss", self.loss, ("hinge", "nonsaturating"))
        _choice("distill.sampler", self.sampler, ("renoise", "euler"))
        _choice("distill.student_input", self.student_input, ("noised", "trajectory"))
        _choice("distill.renoise_times", self.renoise_times, ("logit_normal", "tied"))
        _choice("distill.regression_target", self.regression_target, ("endpoint", "teacher"))
        _choice("distill.gradient_checkpointing", self.gradient_checkpointing, ("auto", "off", "student", "all"))
        _choice("distill.mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))
        _choice("distill.teacher_dtype", self.teacher_dtype, ("auto", "float32", "bfloat16"))
        _choice("distill.schedule", self.schedule, STUDENT_SCHEDULE_NAMES)
        _choice("distill.parallel", self.parallel, ("none", "ddp", "fsdp"))
        if self.parallel == "fsdp" and self.ema_on_cpu:
            raise ConfigError(
                "distill.ema_on_cpu does not combine with parallel: fsdp (the EMA is sharded like the student already)"
            )
        _positive("distill", steps=self.steps, d_steps_per_g=self.d_steps_per_g, checkpoint_every=self.checkpoint_every)
        if self.prefetch is not None and self.prefetch < 0:
            raise ConfigError(f"distill.prefetch must be 0 or more batches (null: by device), got {self.prefetch}")
        _choice("distill.student", self.student, ("full", "lora"))
        if self.student == "lora":
            _positive("distill", lora_rank=self.lora_rank)
            if self.parallel == "fsdp":
                raise ConfigError(
                    "distill.student: lora does not combine with distill.parallel: fsdp (the base weights "
                    "are frozen and the adapters small: use ddp)"
                )
            if not 0 <= self.lora_dropout < 1:
                raise ConfigError(f"distill.lora_dropout must be in [0, 1), got {self.lora_dropout}")
            if self.lora_alpha is not None and self.lora_alpha <= 0:
                raise ConfigError(f"distill.lora_alpha must be > 0 (or null: the rank), got {self.lora_alpha}")
            if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
                raise ConfigError(
                    f"distill.lora_targets must be a non-empty list of groups or module-name suffixes, "
                    f"got {list(self.lora_targets)}"
                )
        if not 0 <= self.backward_share <= 1:
            raise ConfigError(f"distill.backward_share must be in [0, 1], got {self.backward_share}")
        if self.adversarial_weight < 0:
            raise ConfigError(f"distill.adversarial_weight must be >= 0, got {self.adversarial_weight}")
        if self.lr_d <= 0 and self.adversarial_weight > 0:
            raise ConfigError(
                f"distill.lr_d: {self.lr_d:g} with distill.adversarial_weight: {self.adversarial_weight:g} "
                "trains the student against frozen random heads: give lr_d > 0, or set "
                "adversarial_weight: 0 (regression alone)"
            )
        if self.adversarial_time_weights is not None and (
            len(self.adversarial_time_weights) != len(self.student_times) or min(self.adversarial_time_weights) < 0
        ):
            raise ConfigError(
                f"distill.adversarial_time_weights must be {len(self.student_times)} non-negative numbers "
                f"(one per student time {list(self.student_times)}), got {list(self.adversarial_time_weights)}; "
                "null: 1 at every time"
            )
        if min(self.regression_weight, self.regression_weight_one) < 0:
            raise ConfigError("distill.regression_weight and regression_weight_one must be >= 0")
        if self.regression_weight_one > 0 and self.student_input == "noised" and self.regression_target == "endpoint":
            raise ConfigError(
                "distill.regression_weight_one needs student_input: trajectory (or regression_target: "
                "teacher): at t = 1 a noised input is fresh noise, paired with no teacher latent"
            )
        if self.batch_size < 2:
            raise ConfigError(
                f"distill.batch_size must be >= 2 (got {self.batch_size}): the hinge loss degenerates at 1"
            )
        n = len(self.student_times)
        for key in ("warmup_probs", "probs"):
            probs = getattr(self, key)
            if len(probs) != n or abs(sum(probs) - 1) > 1e-6 or min(probs) < 0:
                raise ConfigError(f"distill.{key} must be {n} non-negative numbers summing to 1, got {list(probs)}")
        if not all(0 < t <= 1 for t in self.student_times) or self.student_times[0] != 1.0:
            raise ConfigError(
                f"distill.student_times must start at 1.0 and lie in (0, 1], got {list(self.student_times)}"
            )


@dataclass(frozen=True)
class InpaintConfig:
    """The task: off, text-to-image; on, every stage works on inpainting (a mask and a masked image per record)."""

    enabled: bool = False
    masks_per_image: int = 2  # the teacher's fine-tune: seeded random masks (boxes, strokes) per training image
    mask_seed: int = 0
    teacher_steps: int = 600  # fine-tune of the widened teacher (a 33-channel teacher.pretrained skips it)
    teacher_lr: float = 1e-3

    def __post_init__(self):
        _positive("inpaint", masks_per_image=self.masks_per_image, teacher_steps=self.teacher_steps)


REWARDS = ("classifier", "clip")  # the keys of ladd.align.REWARDS (a test keeps them equal)


@dataclass(frozen=True)
class AlignConfig:
    """The preference stage after distill (LADD's DPO-LoRA): candidates from the student, a reward, best-vs-worst
    pairs, Diffusion-DPO on a LoRA. Off, `ladd align` passes the student through and later stages use it."""

    enabled: bool = False
    out_dir: str = "models/aligned"
    reward: str = (
        "classifier"  # classifier (p of the prompted digit: labelled data) | clip (CLIP score) | ladd.align.REWARDS
    )
    reward_path: str | None = must_exist()  # the reward model's local folder (clip: a CLIP folder; classifier: none)
    prompts: int = 0  # training prompts, the first of the train split (0: all)
    samples: int = 4  # candidates per prompt
    steps: int = 4  # the student's steps for the candidates
    min_margin: float = 0.1  # a pair's winner must beat its loser by this much reward
    min_pairs: int = 32  # fewer pairs above the margin: the stage refuses before training
    lora_rank: int = 256  # the paper's
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_targets: tuple[str, ...] = ("attention", "feed_forward", "adaln")  # as distill.lora_targets
    # how often DPO draws each student time; None: as distill did (its probs), the student's own time distribution
    time_weights: tuple[float, ...] | None = None
    train_steps: int = 100
    batch_size: int = 16  # pairs per step
    sample_batch_size: int = 128  # candidates and probes sampled (and scored) at once; lower it for large images
    lr: float = 1e-4
    beta: float = 2000.0  # DPO strength (Wallace et al.: 2000-5000 for SD)
    probe_prompts: int = 64  # the curve's fresh samples: this many train prompts, new seeds (0: no probe)
    probe_every: int = 50
    mixed_precision: str = "auto"  # auto (bf16 on CUDA) | no | bf16: autocast, and the frozen base weights in bf16
    gradient_checkpointing: str = "auto"  # auto (on for CUDA) | on | off
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        _choice("align.reward", self.reward, REWARDS)
        _choice("align.mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))
        _choice("align.gradient_checkpointing", self.gradient_checkpointing, ("auto", "on", "off"))
        _positive(
            "align",
            samples=self.samples,
            steps=self.steps,
            min_pairs=self.min_pairs,
            lora_rank=self.lora_rank,
            train_steps=self.train_steps,
            batch_size=self.batch_size,
            probe_every=self.probe_every,
            sample_batch_size=self.sample_batch_size,
        )
        if self.samples < 2:
            raise ConfigError(
                f"align.samples must be >= 2 (a pair is two candidates of one prompt), got {self.samples}"
            )
        if self.min_margin < 0 or self.beta <= 0 or self.lr <= 0 or self.prompts < 0 or self.probe_prompts < 0:
            raise ConfigError("align.min_margin, prompts and probe_prompts must be >= 0, beta and lr > 0")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ConfigError(f"align.lora_alpha must be > 0 (or null: the rank), got {self.lora_alpha}")
        if self.time_weights is not None and (min(self.time_weights) < 0 or sum(self.time_weights) <= 0):
            raise ConfigError(
                f"align.time_weights must be non-negative with a positive sum, got {list(self.time_weights)}"
            )
        if not self.lora_targets:
            raise ConfigError("align.lora_targets must name at least one group or module-name suffix")
        if self.enabled and self.reward == "clip" and not self.reward_path:
            raise ConfigError("align.reward: clip needs align.reward_path (a local CLIP model folder)")


FEATURES = ("classifier", "inception", "clip")  # the keys of ladd.quality.FEATURE_EXTRACTORS (a test keeps them equal)
GATE_METRICS = (
    "auto",
    "fd",
    "fd_teacher",
    "fd_teacher_same_noise",
    "fd_reference",
    "fd_reference_same_noise",
    "clip_score",
    "accuracy",
)


def resolve_features(setting: str, labelled_images: bool, clip_path: str | None, inception_path: str | None) -> str:
    """evaluate.features `auto`: the classifier where the data has labelled images (it is trained on them), else CLIP
    where evaluate.clip_path is set, else Inception where evaluate.inception_path is; else ConfigError naming them."""
    if setting != "auto":
        return setting
    if labelled_images:
        return "classifier"
    if clip_path:
        return "clip"
    if inception_path:
        return "inception"
    raise ConfigError(
        "evaluate.features: auto finds no extractor for data without labelled images: set "
        "evaluate.clip_path (a local CLIP folder) or evaluate.inception_path (FID Inception-v3 weights)"
    )


@dataclass(frozen=True)
class EvaluateConfig:
    out_dir: str = "reports"
    split: str = "test"  # the held-out split scored: val (to choose settings) | test (to report, once)
    teacher_steps: int | None = None  # the teacher row's steps; None: those of the teacher the student learnt from
    guidance: float | None = None  # its CFG (and the naive few-step rows'); None: that teacher's (synthesize.guidance)
    # fd_teacher is always against that teacher's samples (the field's FID-T). A CFG here adds the teacher at it as
    # a row of its own, and fd_reference / fd_reference_same_noise against its samples on every row
    reference_guidance: float | None = None
    few_steps: tuple[int, ...] = (1, 2, 4)
    num_samples: int = 0  # held-out prompts to sample (0: the whole split)
    raw_student: bool = False  # evaluate the raw student weights instead of the EMA
    batch_size: int = 128
    grid_size: int = 50
    seeds: tuple[int, ...] = (1234, 1235, 1236)  # every figure is the mean over these sampling seeds, with its spread
    device: str = "auto"
    # [height, width] in pixels to sample at; None: the buckets the student was distilled on (each, share-weighted)
    resolution: tuple[int, ...] | None = None
    features: str = (
        "auto"  # FD extractor: auto (resolve_features) | classifier (labelled data) | inception (FID) | clip
    )
    inception_path: str | None = must_exist()  # local FID Inception-v3 weights file (features: inception)
    clip_path: str | None = must_exist()  # local CLIP folder: clip_score on every row (and features: clip)
    real_images: str = (
        "auto"  # FD/precision/recall against the real held-out images: auto (where the data has them) | required | off
    )
    register: bool = True  # log the student as an MLflow model and register it (with tracking on)
    model_name: str = "ladd-student"
    gate_steps: int = 4  # the champion gate compares the student at this step count
    gate_metric: str = "auto"  # auto (fd with real images, else fd_teacher) | one of GATE_METRICS
    gate_direction: str = "auto"  # auto (the metric's own: lower FD, higher CLIP score/accuracy) | lower | higher
    gate_tolerance: float = 0.0  # how much worse than the champion's the gated metric may be, in its units
    gate_max_accuracy_drop: float = 0.01  # 1 point (where both have an accuracy)
    gate_rescore: bool = True  # a champion measured under another protocol is re-scored under this one (else: refused)

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"evaluate.seeds must be distinct integers (>= 3 for a spread), got {list(self.seeds)}")
        _choice("evaluate.split", self.split, ("val", "test"))
        _choice("evaluate.features", self.features, ("auto", *FEATURES))
        _choice("evaluate.real_images", self.real_images, ("auto", "required", "off"))
        _choice("evaluate.gate_metric", self.gate_metric, GATE_METRICS)
        _choice("evaluate.gate_direction", self.gate_direction, ("auto", "lower", "higher"))
        if self.teacher_steps is not None:
            _positive("evaluate", teacher_steps=self.teacher_steps)
        if self.features == "inception" and not self.inception_path:
            raise ConfigError(
                "evaluate.features: inception needs evaluate.inception_path (a local FID Inception-v3 "
                "weights file, e.g. weights-inception-2015-12-05-6726825d.pth)"
            )
        if self.features == "clip" and not self.clip_path:
            raise ConfigError("evaluate.features: clip needs evaluate.clip_path (a local CLIP model folder)")
        if self.gate_metric == "clip_score" and not self.clip_path:
            raise ConfigError("evaluate.gate_metric: clip_score needs evaluate.clip_path (a local CLIP model folder)")
        if self.gate_metric.startswith("fd_reference") and self.reference_guidance is None:
            raise ConfigError(
                f"evaluate.gate_metric: {self.gate_metric} is measured against the teacher at "
                "evaluate.reference_guidance, which is not set"
            )
        for metric in ("fd_teacher", "fd_reference"):
            if self.gate_metric == metric and len(self.seeds) < 2:
                raise ConfigError(
                    f"evaluate.gate_metric: {metric} compares with the teacher's samples of another seed: "
                    f"evaluate.seeds needs two or more (or gate on {metric}_same_noise)"
                )
        if self.gate_metric == "accuracy" and self.features not in ("classifier", "auto"):
            raise ConfigError(
                f"evaluate.gate_metric: accuracy needs evaluate.features: classifier, got {self.features!r}"
            )
        if self.resolution is not None and (len(self.resolution) != 2 or min(self.resolution) < 1):
            raise ConfigError(f"evaluate.resolution must be [height, width] in pixels, got {list(self.resolution)}")


DIGIT_PROMPTS = (
    "a handwritten digit zero",
    "the number 1 written by hand",
    "a drawing of the digit two",
    "handwritten three",
    "an image of the number 4",
    "a handwritten digit five",
    "handwritten six",
    "the number 7 written by hand",
    "a drawing of the digit eight",
    "an image of the number 9",
)


@dataclass(frozen=True)
class ExportConfig:
    out_dir: str = "models/onnx"
    single_file_dir: str = "models/single_file"  # the transformer (and LoRA) in SD3's original layout + scheduler.json
    report: str = "reports/export.json"
    steps: int = 4  # step count of the unrolled generator graph (the runtime loops the one-step graph for fewer)
    opset: int = 18
    fp16: bool = True  # also export fp16 graphs (for GPUs)
    tolerance: float = 1e-3  # max abs error ORT vs PyTorch (fp32) on every graph; above it the stage fails
    batch_sizes: tuple[int, ...] = (1, 16)  # parity and latency batch sizes
    latency_repeats: int = 20
    threads: int = 0  # intra-op threads for ORT and torch (0: torch's current setting)
    provider: str = "auto"  # auto (TensorRT if installed -> CUDA -> CPU) | cpu | cuda | tensorrt
    prompts: tuple[str, ...] = DIGIT_PROMPTS  # inputs of the parity and latency checks (cycled)
    seed: int = 0
    register: bool = (
        True  # log the ONNX student to MLflow (a self-contained pyfunc model) and register it (with tracking on)
    )
    model_name: str = "ladd-student-onnx"

    def __post_init__(self):
        _choice("export.provider", self.provider, ("auto", "cpu", "cuda", "tensorrt"))
        _positive("export", steps=self.steps, latency_repeats=self.latency_repeats)
        if self.opset < 17:
            raise ConfigError(f"export.opset must be >= 17 (LayerNormalization), got {self.opset}")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"export.batch_sizes must be positive integers, got {list(self.batch_sizes)}")
        if not self.prompts:
            raise ConfigError("export.prompts must hold at least one prompt")
        if self.tolerance <= 0:
            raise ConfigError(f"export.tolerance must be > 0, got {self.tolerance}")


@dataclass(frozen=True)
class ServeConfig:
    """The request limits of the served student: the registered MLflow models (evaluate's and export's), the ONNX
    export's runtime and `ladd generate` (`ladd.serving`)."""

    max_prompts: int = 16  # prompts in one request
    max_prompt_chars: int = (
        2000  # characters in one prompt (the tokenizers keep 77 CLIP / max_sequence_length T5 tokens)
    )

    def __post_init__(self):
        _positive("serve", max_prompts=self.max_prompts, max_prompt_chars=self.max_prompt_chars)


@dataclass(frozen=True)
class LaunchConfig:
    """Where nproc_per_node x nnodes > 1, `ladd <stage>` for the stages listed starts itself under torchrun."""

    nproc_per_node: int = 1  # processes on this node (one per GPU)
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # host:port of torchrun's c10d rendezvous (several nodes); null: standalone
    rdzv_id: str = "ladd"  # the job's name at the rendezvous (the same on every node)
    rdzv_timeout: int = 600  # seconds to wait for every node to join
    stages: tuple[str, ...] = ("synthesize", "distill", "evaluate")

    def __post_init__(self):
        _positive("launch", nproc_per_node=self.nproc_per_node, nnodes=self.nnodes, rdzv_timeout=self.rdzv_timeout)
        if self.rdzv_endpoint and not self.rdzv_endpoint.rpartition(":")[2].isdigit():
            raise ConfigError(f"launch.rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("launch.nnodes > 1 needs launch.rdzv_endpoint (host:port of the first node)")
        for stage in self.stages:
            _choice("launch.stages[]", stage, ("synthesize", "distill", "evaluate"))


@dataclass(frozen=True)
class Params:
    prepare: PrepareConfig
    validate: ValidateConfig
    classifier: ClassifierConfig
    inpaint: InpaintConfig
    teacher: TeacherConfig
    synthesize: SynthesizeConfig
    distill: DistillConfig
    align: AlignConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    serve: ServeConfig
    launch: LaunchConfig


def _choice(key: str, value, allowed: tuple):
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")


def _positive(section: str, **values):
    for key, value in values.items():
        if value < 1:
            raise ConfigError(f"{section}.{key} must be >= 1, got {value}")
