"""The MLflow model registry: the student's versions, their tags and the `champion` alias, the served models logged
into it (self-contained pyfunc models: `ladd.serving`), and the champion gate's flow over them (the decisions
themselves are `ladd.gate`'s pure functions). With ladd.tracking, the only module that imports mlflow."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from ladd.errors import ConfigError, TrackingUnavailable
from ladd.gate import evaluation_tags, evaluations, gate_decision, protocol_differences, protocol_id, resolve_direction
from ladd.io import fingerprint
from ladd.pipeline import read_meta
from ladd.tracking import MlflowTracker, masked_uri, tracking_uri

log = logging.getLogger(__name__)


def _tag(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


class NullRegistry:
    """No tracking store: nothing is registered, there is no champion."""

    def champion(self, name: str) -> dict | None:
        return None

    def download_model(self, name: str, version: str, dst: str | Path) -> Path:
        raise FileNotFoundError(f"no tracking store to download {name} version {version} from")

    def registered_version(self, name: str, identity: dict) -> dict | None:
        return None

    def register_student(self, student_dir, name: str, identity: dict) -> str | None:
        return None

    def tag_version(self, name: str, version: str, tags: dict, remove: tuple = ()) -> None: ...

    def promote(self, name: str, version: str) -> None: ...

    def log_onnx_student(self, onnx_dir, name: str) -> dict | None:
        return None


class MlflowRegistry(NullRegistry):
    def __init__(self, mlflow, model_config: dict | None = None):
        self._mlflow, self.model_config = mlflow, model_config  # model_config: the served models' request limits

    def champion(self, name: str) -> dict | None:
        """The version holding `name`'s `champion` alias: {version, tags}."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            version = MlflowClient().get_model_version_by_alias(name, "champion")
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
                e.error_code == "INVALID_PARAMETER_VALUE" and "alias champion not found" in e.message
            ):
                return None  # no such model, or no champion yet
            # anything else (a server error, no permission) must not let a candidate through without the gate
            raise TrackingUnavailable(
                f"cannot read the champion of {name} from {masked_uri(tracking_uri())}: {e.message.splitlines()[0]}"
            ) from None
        return {"version": str(version.version), "tags": dict(version.tags)}

    def download_model(self, name: str, version: str, dst: str | Path) -> Path:
        """The student pipeline folder of a registered version, downloaded under `dst`."""
        import yaml

        local = Path(
            self._mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst))
        )
        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        if "artifacts" in flavor:  # a version logged as a pickled PythonModel (before ladd.serving)
            return local / flavor["artifacts"]["pipeline"]["path"]
        return local / flavor["data"]

    def registered_version(self, name: str, identity: dict) -> dict | None:
        """The newest version of `name` whose tags hold every `identity` entry (what was registered: the weights'
        fingerprint): {version, tags}, or None."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        try:
            versions = client.search_model_versions(f"name = '{name}'")
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise TrackingUnavailable(
                    f"cannot list the versions of {name} in {masked_uri(tracking_uri())}: {e}"
                ) from None
            return None
        mine = [v for v in versions if all(v.tags.get(k) == _tag(x) for k, x in identity.items())]
        if not mine:
            return None
        v = max(mine, key=lambda v: int(v.version))
        return {"version": str(v.version), "tags": dict(v.tags)}

    def register_student(self, student_dir, name: str, identity: dict) -> str:
        """Register the student pipeline (a pyfunc model: `ladd.serving`) as a new version of `name`, tagged with
        `identity` (the weights' fingerprint). The tags come with the version itself, so a kill after registering
        leaves a version that `registered_version` finds."""
        info = self.log_served("student", student_dir)
        tags = {k: _tag(v) for k, v in identity.items()}
        return str(self._mlflow.register_model(info.model_uri, name, tags=tags).version)

    def log_served(self, artifact_name: str, folder):
        """`folder` (a student pipeline or an ONNX export) as a self-contained pyfunc model: ladd's own code travels
        inside it (code_paths, found before any installed ladd), its requirements are public packages pinned to
        the versions here, and `mlflow models serve` with any environment manager builds and serves it."""
        import shutil
        import tempfile

        from mlflow.models import ModelSignature

        from ladd.serving import served_requirements

        onnx = (Path(folder) / "manifest.json").is_file()
        with tempfile.TemporaryDirectory() as tmp:
            code = Path(tmp) / "ladd"
            shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
            return self._mlflow.pyfunc.log_model(
                name=artifact_name,
                loader_module="ladd.serving",
                data_path=str(folder),
                code_paths=[str(code)],
                model_config=self.model_config or None,
                pip_requirements=served_requirements("onnx" if onnx else "torch"),
                # no input_example: MLflow would load and run a second copy of the student to check it, here,
                # beside the evaluated ones (a 2-8B student twice in memory); the signature says the columns
                signature=ModelSignature(request_schema(folder), response_schema()),
            )

    def tag_version(self, name: str, version: str, tags: dict, remove: tuple = ()) -> None:
        """Set `tags` on a model version; drop those of `remove` it holds."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, _tag(v))
        held = client.get_model_version(name, version).tags if remove else {}
        for k in remove:
            if k in held:
                client.delete_model_version_tag(name, version, k)

    def promote(self, name: str, version: str) -> None:
        """Move `name`'s `champion` alias to `version`."""
        from mlflow.tracking import MlflowClient

        MlflowClient().set_registered_model_alias(name, "champion", version)

    def log_onnx_student(self, onnx_dir, name: str) -> dict:
        """Log the ONNX export as a self-contained pyfunc model (prompts in, PNGs out, onnxruntime only: no
        PyTorch), registered as a version of `name`."""
        identity = {"onnx": fingerprint(onnx_dir)}
        existing = self.registered_version(name, identity)
        if existing is not None:  # this export is registered already (a rerun or a retry)
            return {"model_uri": f"models:/{name}/{existing['version']}", "version": existing["version"]}
        info = self.log_served("student_onnx", onnx_dir)
        version = str(self._mlflow.register_model(info.model_uri, name, tags=identity).version)
        return {"model_uri": f"models:/{name}/{version}", "version": version}


def request_schema(folder):
    """The MLflow input schema: prompt, and optional steps and seed (an inpainting student: image_png, mask_png)."""
    from mlflow.types import ColSpec, Schema

    from ladd.serving import inpainting

    extra = [ColSpec("string", "image_png"), ColSpec("string", "mask_png")] if inpainting(folder) else []
    return Schema(
        [
            ColSpec("string", "prompt"),
            ColSpec("long", "steps", required=False),
            ColSpec("long", "seed", required=False),
            *extra,
        ]
    )


def response_schema():
    from mlflow.types import ColSpec, Schema

    return Schema(
        [ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("long", "steps"), ColSpec("string", "image_png")]
    )


def register_and_gate(
    cfg, candidate: dict, metric: str, protocol: dict, student_dir, registry: NullRegistry, rescore
) -> dict | None:
    """The champion gate on the student's `candidate` figures (at evaluate.gate_steps; `cfg`: the EvaluateConfig). A
    registered version is one set of weights: their version (registered the first time they are evaluated) gets this
    protocol's figures and the gate's decision under it, beside those of other protocols. The champion's own weights
    are kept, never promoted over themselves. `rescore(pipe_dir)`: the champion's figures under this protocol."""
    name, pid = cfg.model_name, protocol_id(protocol)
    identity = {"weights": fingerprint(Path(student_dir) / "transformer", Path(student_dir) / "scheduler")}
    existing, champion = registry.registered_version(name, identity), registry.champion(name)
    is_champion = existing is not None and champion is not None and champion["version"] == existing["version"]
    result = {
        "protocol_id": pid,
        "gate_metric": metric,
        "champion_rescored": None,
        "already_registered": False,
        "previous_champion": champion["version"] if champion and not is_champion else None,
    }
    recorded = evaluations(existing["tags"]).get(pid) if existing else None
    if recorded and recorded["decision"]:  # a rerun or a retry: this evaluation is on its version already
        log.info(
            "%s version %s holds these weights and their figures under this protocol already: kept as it is",
            name,
            existing["version"],
        )
        return {
            **result,
            "version": existing["version"],
            "promoted": recorded["decision"] == "promoted",
            "champion": is_champion,
            "reason": recorded["reason"],
            "already_registered": True,
        }
    if is_champion:
        decision, reason = "kept", "the champion's own weights, evaluated under another protocol: its figures are added"
    else:
        promote, reason, result["champion_rescored"] = _against_champion(
            cfg, candidate, metric, protocol, champion, registry, rescore
        )
        decision = "promoted" if promote else "rejected"
    version = existing["version"] if existing else registry.register_student(student_dir, name, identity)
    if version is None:  # no tracking store
        return None
    latest = {decision: reason} if decision != "kept" else {}  # the version's last verdict, as the UI lists tags
    registry.tag_version(
        name,
        version,
        {**evaluation_tags(protocol, candidate, (decision, reason)), **latest},
        remove=tuple({"promoted", "rejected"} - set(latest)) if latest else (),
    )
    if decision == "promoted":
        registry.promote(name, version)
    return {
        **result,
        "version": version,
        "promoted": decision == "promoted",
        "champion": decision != "rejected",
        "reason": reason,
    }


def _against_champion(
    cfg, candidate: dict, metric: str, protocol: dict, champion: dict | None, registry: NullRegistry, rescore
) -> tuple[bool, str, dict | None]:
    """(promote, reason, the champion's re-scored figures or None): the candidate against the champion's figures
    under this protocol, read from its version, else measured now and kept on it (gate_rescore), else refused."""
    held = evaluations(champion["tags"]) if champion else {}
    figures = held[protocol_id(protocol)]["metrics"] if protocol_id(protocol) in held else None
    rescored = None
    if champion is not None and figures is None:
        if not cfg.gate_rescore:
            nearest = min(
                (e["protocol"] for e in held.values()),
                default=None,
                key=lambda p: len(protocol_differences(protocol, p)),
            )
            return (
                False,
                (
                    f"not compared: champion version {champion['version']} was evaluated under another protocol "
                    f"({'; '.join(protocol_differences(protocol, nearest))}); evaluate.gate_rescore: true "
                    "re-scores it"
                ),
                None,
            )
        log.info(
            "champion %s version %s has no figures under this protocol: re-scoring it",
            cfg.model_name,
            champion["version"],
        )
        with tempfile.TemporaryDirectory() as tmp:
            row = rescore(registry.download_model(cfg.model_name, champion["version"], tmp))
        figures = rescored = row
        registry.tag_version(cfg.model_name, champion["version"], evaluation_tags(protocol, figures))
    promote, reason = gate_decision(
        candidate,
        figures,
        metric,
        resolve_direction(cfg.gate_direction, metric),
        cfg.gate_tolerance,
        cfg.gate_max_accuracy_drop,
    )
    if rescored is not None:
        reason += f" (champion version {champion['version']} re-scored under this protocol)"
    return promote, reason, rescored


def champion_rescorer(score, model_name: str, inpainting: bool, figures: tuple[str, ...]):
    """`rescore(pipe_dir)` for the gate: the champion's student (downloaded to `pipe_dir`) scored under this
    evaluation's protocol by `score(pipe_dir, its ladd.json)`, its `figures`. An inpainting student and a
    text-to-image one never compare."""

    def rescore(pipe_dir) -> dict:
        meta = read_meta(pipe_dir)
        if (meta.get("task") == "inpaint") != inpainting:
            kind = "an inpainting" if not inpainting else "a text-to-image"
            raise ConfigError(
                f"evaluate.model_name: {model_name}'s champion is {kind} student and this one is not: register it "
                "under another evaluate.model_name"
            )
        row = score(pipe_dir, meta)
        return {k: row[k] for k in figures if k in row}

    return rescore


def open_registry(tracker) -> NullRegistry:
    """The registry of the store `tracker` logs to (none for a NullTracker), with its stage's serve limits."""
    if isinstance(tracker, MlflowTracker):
        return MlflowRegistry(tracker._mlflow, tracker.model_config)
    return NullRegistry()
