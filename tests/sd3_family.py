"""Tiny, offline, SD3.5-medium-shaped teachers for tests.

`build_sd35_like_teacher` saves a real `StableDiffusion3Pipeline` folder with every component SD3.5-medium
has, only tiny and random: an MMDiT with QK RMS-norm and dual-attention (MMDiT-X) blocks and a
position-embedding table larger than its native grid (non-square sizes fit), a 16-channel VAE with SD3's
shift/scale, two CLIP text encoders of different widths (like CLIP-L/G), a T5 encoder with its tokenizer, and
SD3's shifted flow-matching scheduler. Nothing is downloaded: the CLIP tokenizers come from
`ladd.tokenizer.write_clip_tokenizer`; the T5 one is a `T5TokenizerFast` (transformers 5: `T5Tokenizer`, a
tokenizers-backed Unigram) built from an in-memory vocabulary, saved as `tokenizer_3/tokenizer.json`.
"""

from __future__ import annotations

import copy
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from ladd.data.prepare import prompt_vocabulary
from ladd.tokenizer import write_clip_tokenizer

CLIP_MAX_LENGTH = 8  # tokenizer.model_max_length of both CLIPs (SD3: 77)
T5_MAX_LENGTH = 12  # tokenizer_3.model_max_length: the folder's max_sequence_length (SD3: 256)
VAE_SHIFT, VAE_SCALE = 0.0609, 1.5305  # SD3's VAE
LATENT_CHANNELS = 16
VAE_SCALE_FACTOR = 8


def t5_tokenizer(words: list[str], model_max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """A SentencePiece-style Unigram tokenizer, T5's layout (<pad>=0, </s>=1, <unk>=2, `</s>` appended):
    every printable character, alone and word-initial (`▁c`), plus each of `words` as one piece."""
    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(p, -5.0) for c in chars for p in (c, "▁" + c)]
    seen = {p for p, _ in vocab}
    vocab += [(p, -1.0) for w in sorted({w.lower() for w in words}) if (p := "▁" + w) not in seen]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _clip(
    tokenizer, hidden: int, seed: int, layers: int = 2, intermediate: int | None = None
) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def build_sd35_like_teacher(
    out_dir: Path,
    *,
    sample_size: int = 8,
    seed: int = 0,
    words: list[str] | None = None,
    clip_dims: tuple[int, int] = (16, 32),
    t5_dim: int = 64,
    clip_max_length: int = CLIP_MAX_LENGTH,
    t5_max_length: int = T5_MAX_LENGTH,
    text_layers: int = 2,
    text_ff: int | None = None,
) -> Path:
    """Save a tiny random SD3.5-medium-shaped `StableDiffusion3Pipeline` to `out_dir` and return it.

    `sample_size` is the latent side (images are `8 * sample_size` pixels; height and width must be multiples
    of 16); the position table (in patches) takes latents up to `4 * sample_size` a side. `words` become single tokens
    (default: the project's prompt vocabulary). Widths: CLIPs 16 + 32 (pooled 48), T5 / joint 64, MMDiT 2x16.
    """
    words = prompt_vocabulary() if words is None else words
    with tempfile.TemporaryDirectory() as tmp:
        clip_tok = write_clip_tokenizer(Path(tmp), words, clip_max_length)
    t5_tok = t5_tokenizer(words, t5_max_length)
    joint = t5_dim

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=VAE_SCALE_FACTOR * sample_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=VAE_SHIFT,
        scaling_factor=VAE_SCALE,
    )
    torch.manual_seed(seed + 1)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=3,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint,
        caption_projection_dim=32,
        pooled_projection_dim=sum(clip_dims),
        pos_embed_max_size=2 * sample_size,
        qk_norm="rms_norm",
        dual_attention_layers=(0, 1),
    )
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=joint,
            d_kv=16,
            d_ff=text_ff or 2 * joint,
            num_layers=text_layers,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=_clip(clip_tok, clip_dims[0], seed + 3, text_layers, text_ff),
        tokenizer=clip_tok,
        text_encoder_2=_clip(clip_tok, clip_dims[1], seed + 4, text_layers, text_ff),
        tokenizer_2=copy.deepcopy(clip_tok),
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    out_dir = Path(out_dir)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_clip(
    out_dir: Path, *, image_size: int = 32, crop_size: int | None = None, seed: int = 0, words: list[str] | None = None
) -> Path:
    """A tiny random `CLIPModel` + `CLIPProcessor` folder, the layout of openai/clip-vit-large-patch14 (the real
    loading path of `evaluate.clip_path`; its scores mean nothing). `crop_size` other than `image_size` makes
    a folder whose processor feeds the vision tower the wrong size."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out_dir = Path(out_dir)
    tokenizer = write_clip_tokenizer(out_dir / "_tokenizer", prompt_vocabulary() if words is None else words, 77)
    torch.manual_seed(seed)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            **ids,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(out_dir)
    crop = crop_size or image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(out_dir)
    import shutil

    shutil.rmtree(out_dir / "_tokenizer")
    return out_dir


def build_random_inception(path: Path) -> Path:
    """torch-fidelity's FID Inception-v3, built by the library with its random initialisation (its constructor
    insists on loading weights: that one call is skipped) and saved as safetensors: the real loading path of
    `evaluate.inception_path` with meaningless numbers."""
    from unittest import mock

    from safetensors.torch import save_file

    from ladd.quality import FID_FEATURES, _fidelity_inception_class

    network = _fidelity_inception_class()
    with (
        mock.patch.object(network, "load_state_dict", lambda self, state: None),
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {}),
    ):
        torch.manual_seed(0)
        net = network("inception-v3-compat", [FID_FEATURES])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return Path(path)
