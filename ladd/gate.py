"""The champion gate: a candidate's figures are compared with a champion's only when both were measured under
the same evaluation protocol (prompt set, sample count, seeds, resolution, step counts, extractor and the
fingerprints of its weights and of the references). Pure functions: `ladd.registry` asks the store for the
champion, re-scores it when it has no figures under this protocol, and records the decision.

A registered version is one set of weights; each protocol it was evaluated under leaves its figures on it as
model-version tags keyed by the protocol's id: `gate/<id>/protocol` (the protocol, JSON), `gate/<id>/<metric>`
and `gate/<id>/decision` (the gate's verdict under that protocol, for a candidate)."""

from __future__ import annotations

import hashlib
import json

# the gated metric -> which way is better
GATE_DIRECTIONS = {
    "fd": "lower",
    "fd_teacher": "lower",
    "fd_teacher_same_noise": "lower",
    "fd_reference": "lower",
    "fd_reference_same_noise": "lower",
    "clip_score": "higher",
    "accuracy": "higher",
}


def prompts_fingerprint(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]


def protocol_id(protocol: dict) -> str:
    """A short, stable name of an evaluation protocol (the key of its figures on a model version)."""
    return hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]


def evaluation_tags(protocol: dict, figures: dict, decision: tuple[str, str] | None = None) -> dict:
    """The model-version tags of one evaluation: the protocol, its figures and, for a candidate, the gate's
    (decision, reason): decision `promoted`, `rejected`, or `kept` (the champion's own weights)."""
    pid = protocol_id(protocol)
    tags = {
        f"gate/{pid}/protocol": json.dumps(protocol, sort_keys=True),
        **{f"gate/{pid}/{k}": repr(float(v)) for k, v in figures.items()},
    }
    if decision is not None:
        tags[f"gate/{pid}/decision"], tags[f"gate/{pid}/reason"] = decision
    return tags


def evaluations(tags: dict) -> dict:
    """{protocol id: {"protocol", "metrics", "decision", "reason"}}, read back from a version's tags."""
    found: dict = {}
    for key, value in tags.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "gate":
            continue
        entry = found.setdefault(parts[1], {"protocol": None, "metrics": {}, "decision": None, "reason": None})
        if parts[2] == "protocol":
            entry["protocol"] = json.loads(value)
        elif parts[2] in ("decision", "reason"):
            entry[parts[2]] = value
        else:
            entry["metrics"][parts[2]] = float(value)
    return found


def protocol_differences(candidate: dict, champion: dict | None) -> list[str]:
    """'key: champion's value -> candidate's' for every protocol entry that differs (all, for no protocol)."""
    if champion is None:
        return ["no recorded protocol (registered before protocols were recorded)"]
    return [
        f"{k}: {champion.get(k)} -> {candidate.get(k)}"
        for k in sorted(set(candidate) | set(champion))
        if candidate.get(k) != champion.get(k)
    ]


def resolve_metric(setting: str, has_real_images: bool) -> str:
    """`auto`: FD against the real images where the data has them, else against the teacher's samples."""
    if setting != "auto":
        return setting
    return "fd" if has_real_images else "fd_teacher"


def resolve_direction(setting: str, metric: str) -> str:
    return GATE_DIRECTIONS[metric] if setting == "auto" else setting


def gate_decision(
    candidate: dict, champion: dict | None, metric: str, direction: str, tolerance: float, max_accuracy_drop: float
) -> tuple[bool, str]:
    """Promote when `metric` is no worse than the champion's (by at most `tolerance`, in the metric's units),
    and, where both have an accuracy and it is not the gated metric, it is at most `max_accuracy_drop` lower."""
    if champion is None:
        return True, "no champion yet"
    if metric not in champion:
        return False, f"the champion has no {metric} to compare with"
    ours, theirs = candidate[metric], champion[metric]
    worse = ours > theirs + tolerance if direction == "lower" else ours < theirs - tolerance
    if worse:
        return False, (
            f"{metric} {ours:.3f} worse than the champion's {theirs:.3f} ({direction} is better, {tolerance:g} allowed)"
        )
    if metric != "accuracy" and "accuracy" in candidate and "accuracy" in champion:
        if candidate["accuracy"] < champion["accuracy"] - max_accuracy_drop:
            return False, (
                f"accuracy {candidate['accuracy']:.3f} more than {max_accuracy_drop} below the champion's "
                f"{champion['accuracy']:.3f}"
            )
    return True, f"{metric} {ours:.3f} vs the champion's {theirs:.3f} ({direction} is better)"
