"""Named distillation recipes: each a plain dict of `distill` settings that `distill.preset` applies over
params.yaml's section, so the paper's recipe (and every other compared one) is one setting away.
`ladd.variants` implements the pieces they name. Plain data: no imports, so config loading stays light."""

_PAPER_LADD = dict(
    adversarial_weight=1.0,
    adversarial_time_weights=None,
    student_input="noised",
    backward_share=0.0,
    renoise_times="logit_normal",
    renoise_mean=1.0,
    renoise_std=1.0,
    regression_weight=0.0,
    regression_weight_one=0.0,
    regression_target="endpoint",
    feature_layers=None,
)
DISTILL_PRESETS: dict[str, dict] = {
    # params.yaml's recipe without its adversarial term (regression alone): what the adversarial loss buys
    "no_adversarial": {"adversarial_weight": 0.0},
    # Sauer et al. 2024 as published: noised teacher latents, t_hat ~ LogitNormal(1, 1), adversarial loss alone
    "ladd": _PAPER_LADD,
    # the paper's recipe at the settings benchmarks/tune.py chose for it on val (docs/results/recipes.md): slower
    # heads, features of the two shallowest teacher blocks, lr_g 3e-5 (params.yaml's is 1e-4)
    "ladd_tuned": {**_PAPER_LADD, "lr_d": 1e-4, "feature_layers": (0, 1), "lr_g": 3e-5},
    # t < 1 inputs are the teacher's own path states, regressed onto their sharp endpoints (PCM, Hyper-SD)
    "trajectory": {**_PAPER_LADD, "student_input": "trajectory", "regression_weight": 1.0},
    # the discriminator judges a t < 1 sample at noise below its student time
    "tied_times": {**_PAPER_LADD, "renoise_times": "tied"},
    # half the t < 1 inputs come from the student's own earlier steps (DMD2's backward simulation)
    "backward": {**_PAPER_LADD, "backward_share": 0.5},
    # params.yaml's recipe on a LoRA student: adapters start at zero and want a higher lr than full's
    # (docs/results/students.md)
    "lora": {"student": "lora", "lr_g": 1e-3},
    # t < 1 predictions anchored to the frozen teacher's one-step x0 prediction at the same input
    "teacher_anchor": {**_PAPER_LADD, "regression_weight": 1.0, "regression_target": "teacher"},
}
