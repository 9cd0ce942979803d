"""Probe (work in progress, issue #22): does DPO-LoRA on the embedded default's student raise the classifier
reward of fresh 4-step samples on held-out prompts? Prints before/after reward and accuracy, mean ± std over seeds.

    python benchmarks/align_probe.py [--prompts 200] [--samples 4] [--steps 150] [--beta 500] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import time
import types

import pandas as pd
import torch

from ladd import lora
from ladd.align import candidates, load_reward, preference_pairs, train_dpo
from ladd.pipeline import encode_prompts, load_pipeline, max_sequence_length, read_meta


def labels_of(frame: pd.DataFrame) -> list[int]:
    return frame["label"].astype(int).tolist()


def score_fresh(pipe, meta, prompts, labels, reward, k, seeds):
    out = []
    for seed in seeds:
        _, img = candidates(pipe, meta, prompts, 1, k, seed)
        r = reward(img[:, 0], prompts, labels)
        out.append((float(r.mean()), float((r > 0.5).float().mean())))
    t = torch.tensor(out)
    return t.mean(0).tolist(), t.std(0).tolist()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--beta", type=float, default=500.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--margin", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(2)
    student = "models/student"
    pipe, meta = load_pipeline(student), read_meta(student)
    reward = load_reward("classifier", None, "models/classifier")
    train = pd.read_parquet("data/prepared/train/captions.parquet").sample(args.prompts, random_state=0)
    test = pd.read_parquet("data/prepared/test/captions.parquet")
    prompts, labels = train["prompt"].tolist(), labels_of(train)
    start = time.perf_counter()
    lat, img = candidates(pipe, meta, prompts, args.samples, args.k, seed=10_000)
    rewards = torch.stack([reward(img[:, j], prompts, labels) for j in range(args.samples)], 1)
    keep, w, l = preference_pairs(rewards, args.margin)
    print(f"{len(keep)} pairs of {len(prompts)} prompts (margin >= {args.margin}); candidates {time.perf_counter() - start:.0f} s")
    e, p = encode_prompts(pipe, [prompts[i] for i in keep.tolist()], meta["max_sequence_length"])
    x_w, x_l = lat[keep, w], lat[keep, l]
    seeds = [1, 2, 3]
    before = score_fresh(pipe, meta, test["prompt"].tolist(), labels_of(test), reward, args.k, seeds)
    cfg = types.SimpleNamespace(lora_rank=args.rank, lora_alpha=None, lora_dropout=0.0)
    suffixes = lora.target_suffixes(pipe.transformer, ["attention", "feed_forward", "adaln"])
    start = time.perf_counter()
    weights, layers, curve = train_dpo(pipe.transformer, cfg, suffixes, x_w, x_l, e, p,
                                       torch.tensor(meta["student_times"]), args.steps, args.batch, args.lr, args.beta, 0)
    train_s = time.perf_counter() - start
    with lora.adapters(layers, on=True):
        after = score_fresh(pipe, meta, test["prompt"].tolist(), labels_of(test), reward, args.k, seeds)
    last = curve[-20:]
    print(f"train {train_s:.0f} s; last 20 steps: loss {sum(r['loss'] for r in last) / len(last):.3f}, implicit "
          f"accuracy {sum(r['implicit_accuracy'] for r in last) / len(last):.2f}")
    print(f"held-out {len(test)} prompts, {args.k} steps, seeds {seeds}: reward {before[0][0]:.4f}±{before[1][0]:.4f} -> "
          f"{after[0][0]:.4f}±{after[1][0]:.4f}; accuracy {before[0][1]:.4f}±{before[1][1]:.4f} -> {after[0][1]:.4f}±{after[1][1]:.4f}")


if __name__ == "__main__":
    main()
