import json
import string

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

from ladd.config import TeacherConfig
from ladd.pipeline import decode_latents, encode_prompts, latent_shape, load_pipeline, max_sequence_length, read_meta
from ladd.sampling import cfg_velocity, flow_sigmas, initial_noise, sample_euler
from ladd.teacher import build_tiny_pipeline, teacher_stage
from ladd.tracking import NullTracker


def test_tiny_teacher_folder_is_a_diffusers_pipeline(tiny_teacher_dir):
    index = json.loads((tiny_teacher_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None]
    assert read_meta(tiny_teacher_dir) == {"max_sequence_length": 1, "source": "tiny"}
    # the documented plain diffusers call
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_teacher_dir, text_encoder_3=None, tokenizer_3=None)
    out = pipe(
        "a handwritten digit two",
        num_inference_steps=3,
        guidance_scale=3.0,
        max_sequence_length=1,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images[0].size == (32, 32)


def test_save_reload_round_trip(tiny_teacher_dir, tmp_path):
    """Saved and reloaded teacher gives bit-identical embeddings, velocities and decoded images."""
    a = load_pipeline(tiny_teacher_dir)
    a.save_pretrained(tmp_path / "copy")
    b = load_pipeline(tmp_path / "copy")
    prompts = ["handwritten nine", "an image of the number 1"]
    ea, pa = encode_prompts(a, prompts, 1)
    eb, pb = encode_prompts(b, prompts, 1)
    assert torch.equal(ea, eb) and torch.equal(pa, pb)
    x = initial_noise(2, latent_shape(a), torch.Generator().manual_seed(0))
    t = torch.tensor(0.7)
    assert torch.equal(cfg_velocity(a.transformer, ea, pa)(x, t), cfg_velocity(b.transformer, eb, pb)(x, t))
    assert torch.equal(decode_latents(a.vae, x), decode_latents(b.vae, x))
    assert a.vae.config.scaling_factor == b.vae.config.scaling_factor != 1.0  # set from the data


def _t5_tokenizer(words):
    """A real T5 (Unigram, sentencepiece-style) tokenizer built in memory: no hub."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in string.ascii_lowercase + string.digits]
    vocab += [("\u2581" + w, -1.0) for w in words]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


@pytest.fixture
def t5_pipeline_dir(tmp_path):
    """An SD3-family pipeline with all three text encoders, like the real SD3, saved as a user would have it."""
    cfg = TeacherConfig(seed=3)
    base = build_tiny_pipeline(cfg, channels=3, resolution=16, words=["digit", "seven"])
    tokenizer_3 = _t5_tokenizer(["a", "digit", "seven", "handwritten"])
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=64, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    pipe = StableDiffusion3Pipeline(**{**base.components, "text_encoder_3": t5.eval(), "tokenizer_3": tokenizer_3})
    pipe.save_pretrained(tmp_path / "user_sd3")
    return tmp_path / "user_sd3"


def test_pretrained_teacher_with_t5_takes_the_same_path(t5_pipeline_dir, tmp_path):
    cfg = TeacherConfig(pretrained=str(t5_pipeline_dir), out_dir=str(tmp_path / "teacher"), max_sequence_length=8)
    out = teacher_stage(cfg, tmp_path / "no-data-needed", "cpu", NullTracker())
    assert read_meta(out)["source"] == str(t5_pipeline_dir)
    pipe = load_pipeline(out)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    msl = max_sequence_length(out)
    assert msl == 8
    embeds, pooled = encode_prompts(pipe, ["a handwritten digit seven"], msl)
    assert embeds.shape == (1, 16 + 8, 64)  # CLIP tokens then T5 tokens, as SD3 concatenates them
    assert embeds[0, 16:].abs().sum() > 0  # the T5 part is real, not the zero padding of a T5-less teacher
    # our sampler and diffusers' call agree on this teacher too
    null_e, null_p = encode_prompts(pipe, [""], msl)
    x = initial_noise(1, latent_shape(pipe), torch.Generator().manual_seed(4))
    ours = sample_euler(cfg_velocity(pipe.transformer, embeds, pooled, null_e, null_p, 3.0), x, flow_sigmas(3))
    ref = pipe(
        "a handwritten digit seven",
        num_inference_steps=3,
        guidance_scale=3.0,
        max_sequence_length=msl,
        generator=torch.Generator().manual_seed(4),
        output_type="latent",
    ).images
    assert (ours - ref).abs().max() <= 1e-5
    assert decode_latents(pipe.vae, ours).shape == (1, 3, 16, 16)


def test_a_folder_without_ladd_json_gets_diffusers_t5_length(t5_pipeline_dir, tmp_path, caplog):
    """Its T5 tokenizer may allow more (an SD3.5 folder says 512): the slot is diffusers' default 256 unless
    teacher.max_sequence_length says otherwise, and the stage logs the length it chose."""
    import logging

    from ladd.pipeline import DEFAULT_MAX_SEQUENCE_LENGTH
    from ladd.teacher import t5_slot_length

    assert DEFAULT_MAX_SEQUENCE_LENGTH == 256
    assert max_sequence_length(t5_pipeline_dir) == 256
    assert t5_slot_length(TeacherConfig(pretrained=str(t5_pipeline_dir))) == 256
    assert t5_slot_length(TeacherConfig(pretrained=str(t5_pipeline_dir), max_sequence_length=77)) == 77
    assert t5_slot_length(TeacherConfig()) == 1  # the tiny teacher: no T5
    with caplog.at_level(logging.INFO, logger="ladd.teacher"):
        out = teacher_stage(
            TeacherConfig(pretrained=str(t5_pipeline_dir), out_dir=str(tmp_path / "t")), tmp_path, "cpu", NullTracker()
        )
    assert read_meta(out)["max_sequence_length"] == 256 == max_sequence_length(out)
    assert "T5 slot of 256 tokens" in caplog.text
