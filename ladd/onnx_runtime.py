"""Few-step generation from the exported ONNX student with onnxruntime: numpy, `tokenizers` and
onnxruntime only (no PyTorch), so it deploys on its own.

Providers are asked for in the order TensorRT (when its library is present) -> CUDA -> CPU. An
onnxruntime-gpu session asked for CUDA on a machine without it silently runs on the CPU, so the
provider actually used is read back from the session, logged, and a missing GPU gets a warning.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import functools
import io
import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ladd.serving import LIMITS, Request, check_request, seeded_draws

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
NUM_TRAIN_TIMESTEPS = 1000  # the transformer takes timestep = 1000 t
PROVIDER_CHOICES = ("auto", "cpu", "cuda", "tensorrt")


def requested_providers(provider: str = "auto") -> list[str]:
    if provider not in PROVIDER_CHOICES:
        raise ValueError(f"provider must be one of {PROVIDER_CHOICES}, got {provider!r}")
    available = ort.get_available_providers()  # onnxruntime-gpu lists CUDA/TensorRT even without the libraries
    wanted = {
        "cpu": [],
        "cuda": ["CUDAExecutionProvider"],
        "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
    }.get(provider)
    if wanted is None:  # auto: TensorRT only when libnvinfer is installed, else it fails loudly at every session
        wanted = (["TensorrtExecutionProvider"] if ctypes.util.find_library("nvinfer") else []) + [
            "CUDAExecutionProvider"
        ]
    wanted = [p for p in wanted if p in available and p not in _UNUSABLE]
    if wanted:
        _preload_cuda_libraries()
    return wanted + ["CPUExecutionProvider"]


@functools.cache
def _preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from pip's nvidia-* packages (torch's CUDA wheel, or onnxruntime-gpu[cuda,cudnn]) so
    that no LD_LIBRARY_PATH is needed; what is missing shows in the session's fallback warning."""
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()):
            ort.preload_dlls()


_UNUSABLE: set[str] = set()  # providers a session of this process already fell back from: asked for once


def open_session(
    path: str | Path, provider: str = "auto", threads: int = 0, optimization: str = "all"
) -> ort.InferenceSession:
    """An InferenceSession on the best provider asked for; warns when it fell back to the CPU."""
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if threads:
        options.intra_op_num_threads = threads
    providers = requested_providers(provider)
    session = ort.InferenceSession(str(path), options, providers=providers)
    used = session.get_providers()[0]
    if used != providers[0]:
        _UNUSABLE.update(providers[: providers.index(used)])
        log.warning(
            "%s: %s is not usable here (onnxruntime-gpu %s needs CUDA 13 and cuDNN 9; see docs/guide/onnx.md); "
            "falling back to %s",
            Path(path).name,
            providers[0],
            ort.__version__,
            used,
        )
    log.info("onnxruntime session %s on %s", Path(path).name, used)
    return session


RUNTIME_SETTINGS = "runtime_settings.json"  # per machine: what benchmarks/onnx_latency.py measured fastest there
DEFAULT_SETTINGS = {"threads": 0, "optimization": "all", "io_binding": False}


def machine_key(provider: str = "auto") -> str:
    """This machine as runtime settings are keyed: CPU model, logical cores, onnxruntime version and the provider a
    session would ask for first (the timings, and so the best settings, move with each)."""
    import os
    import platform

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    return f"{model} x{os.cpu_count()} / onnxruntime {ort.__version__} / {requested_providers(provider)[0]}"


def tuned_settings(onnx_dir: str | Path, provider: str = "auto") -> dict:
    """The settings measured fastest on this machine for this export ({} when none were measured here)."""
    path = Path(onnx_dir) / RUNTIME_SETTINGS
    machines = json.loads(path.read_text()).get("machines", {}) if path.is_file() else {}
    return machines.get(machine_key(provider), {}).get("settings", {})


def session_feeds(session: ort.InferenceSession, **arrays) -> dict:
    """The arrays the session's graph takes, each cast to its input dtype (the fp16 variant takes float16)."""
    dtypes = {i.name: np.float16 if i.type == "tensor(float16)" else None for i in session.get_inputs()}
    return {k: (v.astype(dtypes[k]) if dtypes[k] is not None else v) for k, v in arrays.items() if k in dtypes}


def run_session(session: ort.InferenceSession, outputs: list[str], feeds: dict, io_binding: bool = False) -> list:
    """session.run, or through I/O binding: inputs copied to the provider's device once, outputs left where the
    provider puts them and copied back at the end (on a GPU: no per-call host staging)."""
    if not io_binding:
        return session.run(outputs, feeds)
    binding = session.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for name in outputs:
        binding.bind_output(name)
    session.run_with_iobinding(binding)
    return binding.copy_outputs_to_cpu()


class PromptTokenizer:
    """A pipeline tokenizer from its tokenizer.json, padded and truncated as diffusers' SD3 pipeline does."""

    def __init__(self, path: Path, max_length: int, pad_id: int, pad_token: str):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)

    @classmethod
    def from_manifest(cls, root: Path, entry: dict) -> PromptTokenizer:
        return cls(root / entry["file"], entry["max_length"], entry["pad_id"], entry["pad_token"])

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return np.array([e.ids for e in self.tokenizer.encode_batch(prompts)], dtype=np.int64)


class OnnxStudent:
    """The exported student: prompts -> images. The unrolled graph runs the exported step count; other
    step counts (those in the manifest's schedules) loop the one-step transformer graph."""

    def __init__(
        self,
        onnx_dir: str | Path,
        precision: str = "fp32",
        provider: str = "auto",
        threads: int | None = None,
        optimization: str | None = None,
        io_binding: bool | None = None,
    ):
        """`threads`, `optimization`, `io_binding`: None takes what benchmarks/onnx_latency.py measured fastest on
        this machine (`runtime_settings.json` in the export), else ORT's defaults (all cores, every optimisation)."""
        self.dir = Path(onnx_dir)
        manifest_path = self.dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{self.dir} is not a ladd ONNX export: {manifest_path} is missing (run `ladd export`)"
            )
        self.manifest = json.loads(manifest_path.read_text())
        if precision not in self.manifest["models"]:
            raise ValueError(f"{manifest_path}: no {precision!r} models (has {', '.join(self.manifest['models'])})")
        self.files = self.manifest["models"][precision]
        self.tokenizers = {
            name: PromptTokenizer.from_manifest(self.dir, t) for name, t in self.manifest["tokenizers"].items()
        }
        asked = {"threads": threads, "optimization": optimization, "io_binding": io_binding}
        tuned = tuned_settings(self.dir, provider)
        self.settings = {k: v if v is not None else tuned.get(k, DEFAULT_SETTINGS[k]) for k, v in asked.items()}
        if tuned:
            log.info("%s: runtime settings measured on this machine: %s", self.dir / RUNTIME_SETTINGS, self.settings)
        self._open = lambda name: open_session(
            self.dir / self.files[name], provider, self.settings["threads"], self.settings["optimization"]
        )
        self._sessions: dict[str, ort.InferenceSession] = {}

    def session(self, name: str) -> ort.InferenceSession:
        if name not in self._sessions:
            self._sessions[name] = self._open(name)
        return self._sessions[name]

    @property
    def provider(self) -> str:
        return self.session("generator").get_providers()[0]

    @property
    def steps(self) -> int:
        return int(self.manifest["steps"])

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds, pooled_projections) as the pipeline's encode_prompt computes them."""
        session = self.session("text_encoder")
        ids = {self.manifest["tokenizers"][name]["input"]: tok(prompts) for name, tok in self.tokenizers.items()}
        embeds, pooled = session.run(["prompt_embeds", "pooled_projections"], ids)
        return embeds.astype(np.float32), pooled.astype(np.float32)

    def step_noise(self, seeds: list[int], steps: int) -> tuple[np.ndarray, np.ndarray]:
        """x_1 and the re-noising draws for each record from its own seed (`ladd.serving.seeded_draws`: the
        served PyTorch student draws the same)."""
        return seeded_draws(seeds, steps, tuple(self.manifest["latent_shape"]))

    def inpaint_condition(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """An inpainting student's condition from images in [0, 1] [N, C, H, W] and masks [N, 1, H, W] (1: inpaint)."""
        session = self.session("inpaint_condition")
        return session.run(["condition"], session_feeds(session, images=images, masks=masks))[0].astype(np.float32)

    def generate_latents(
        self,
        embeds,
        pooled,
        noise,
        step_noise,
        steps: int | None = None,
        unrolled: bool | None = None,
        condition: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(latents, images in [0, 1]) from x_1 `noise` [N, C, H, W] and `step_noise` [steps - 1, N, C, H, W]
        (an inpainting student: beside `condition`, from `inpaint_condition`). `unrolled` (default: when `steps`
        is the exported count) picks the generator graph over the loop."""
        if (self.manifest.get("task") == "inpaint") != (condition is not None):
            raise ValueError(
                f"{self.dir / MANIFEST}: a {self.manifest.get('task', 'text2image')} student "
                f"{'needs' if condition is None else 'takes no'} condition (images and masks)"
            )
        steps = steps or self.steps
        if unrolled is None:
            unrolled = steps == self.steps
        if unrolled:
            if steps != self.steps:
                raise ValueError(f"the unrolled generator runs {self.steps} steps, not {steps}")
            session = self.session("generator")
            feeds = session_feeds(
                session,
                noise=noise,
                prompt_embeds=embeds,
                pooled_projections=pooled,
                step_noise=step_noise,
                condition=condition,
            )
            latents, images = run_session(session, ["latents", "images"], feeds, self.settings["io_binding"])
            return latents.astype(np.float32), images.astype(np.float32)
        if str(steps) not in self.manifest["schedules"]:
            raise ValueError(
                f"{self.dir / MANIFEST}: no schedule for {steps} steps (have {', '.join(self.manifest['schedules'])})"
            )
        sigmas = self.manifest["schedules"][str(steps)]
        transformer, x = self.session("transformer"), noise
        for i in range(steps):
            t, t_next = sigmas[i], sigmas[i + 1]
            x_in = x if condition is None else np.concatenate([x, condition], 1)
            feeds = session_feeds(
                transformer,
                hidden_states=x_in,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                timestep=np.full(len(x), t * NUM_TRAIN_TIMESTEPS, dtype=np.float32),
            )
            v = transformer.run(["velocity"], feeds)[0].astype(np.float32)
            # a numpy copy of ladd.sampling.step (this module runs without PyTorch); test_export's parity tests
            # hold it to the exported graph and to the PyTorch student
            if self.manifest["sampler"] == "renoise":  # x0 = x_t - t v, then fresh noise to t_next (ADD/LADD)
                x0 = x - t * v
                x = (1 - t_next) * x0 + t_next * step_noise[i] if i < steps - 1 else x0
            else:  # Euler on the flow ODE
                x = x + (t_next - t) * v
        decoder = self.session("vae_decoder")
        images = decoder.run(["images"], session_feeds(decoder, latents=x))[0]
        return x.astype(np.float32), images.astype(np.float32)

    @property
    def meta(self) -> dict:
        """What the request rules read: the trained step counts (an older export: every scheduled one), the
        default steps, the task and the export's request limits."""
        m = self.manifest
        return {
            "trained_steps": m.get("trained_steps") or sorted(map(int, m["schedules"])),
            "default_steps": m.get("default_steps", m["steps"]),
            "task": m.get("task", "text2image"),
            **m.get("limits", {}),
        }

    def request(self, prompts, steps=None, seeds=None, **limits) -> Request:
        """`ladd.serving.check_request` under this export's rules (`limits` override its max_prompts and
        max_prompt_chars)."""
        meta = self.meta
        rules = {k: int(meta.get(k, v)) for k, v in LIMITS.items()} | limits
        return check_request(
            prompts,
            steps,
            seeds,
            trained_steps=meta["trained_steps"],
            default_steps=int(meta["default_steps"]),
            **rules,
        )

    def run(self, request: Request, images: np.ndarray | None = None, masks: np.ndarray | None = None) -> np.ndarray:
        """uint8 images [N, H, W, C] for a checked request. An inpainting student fills `images` (float
        [N, C, H, W] in [0, 1]) where `masks` ([N, 1, H, W]) are 1."""
        embeds, pooled = self.encode(request.prompts)
        noise, step_noise = self.step_noise(request.seeds, request.steps)
        condition = (
            None if images is None else self.inpaint_condition(images.astype(np.float32), masks.astype(np.float32))
        )
        _, out = self.generate_latents(embeds, pooled, noise, step_noise, request.steps, condition=condition)
        return (out.transpose(0, 2, 3, 1) * 255).round().clip(0, 255).astype(np.uint8)

    def __call__(
        self,
        prompts: list[str],
        steps: int | None = None,
        seeds: list[int] | None = None,
        images: np.ndarray | None = None,
        masks: np.ndarray | None = None,
    ) -> np.ndarray:
        """uint8 images [N, H, W, C] for `prompts` (record i: seeds[i], default a fresh seed), checked as a request."""
        return self.run(self.request(prompts, steps, seeds), images, masks)
