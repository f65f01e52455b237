"""Pipeline and workflow files: parse, validate, resolve.

A *pipeline* (``pipelines/*.yaml``, owned by engineers) declares inputs, stages, how their
inputs and outputs are wired, and default params. A *workflow* (``workflows/*.yaml``, owned
by researchers) names a pipeline, binds its inputs to paths (relative to the workflow file)
and overrides declared params. YAML is data only; any unknown key is an error naming its
dotted path with the closest valid key.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medseg.errors import ConfigError
from medseg.registry import Registry
from medseg.resources import shipped_dir
from medseg.runner.contract import Kind, Params, Stage


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PipelineInput(_Strict):
    """A declared pipeline input (a path the workflow binds) and the kind of artifact it is.

    ``kind`` is ``source`` (files as the user has them) unless the path must be a medseg
    artifact, e.g. ``export`` for a model folder.
    """

    description: str = ""
    kind: Kind = Kind.SOURCE


class PipelineStage(_Strict):
    """One stage in a pipeline: its type, wiring and default params.

    ``inputs`` maps the stage type's input names to ``inputs.<name>`` (a pipeline input) or
    ``<stage>.<output>`` (an upstream stage's output).
    """

    uses: str
    inputs: dict[str, str] = Field(default_factory=dict)
    params: dict[str, Any] = Field(default_factory=dict)


class Pipeline(_Strict):
    """A pipeline definition."""

    name: str
    description: str = ""
    inputs: dict[str, PipelineInput] = Field(default_factory=dict)
    stages: dict[str, PipelineStage]


class TrackingSettings(_Strict):
    """Where and how a workflow run is tracked."""

    uri: str | None = None
    experiment: str | None = None


class Workflow(_Strict):
    """A study configuration binding a pipeline to data and params.

    ``seed`` drives everything random; ``seeds`` repeats the run once per listed seed for the
    stages that train and judge (the data split keeps ``seed``), so that the spread of every
    metric over seeds is measured.
    """

    pipeline: str
    name: str | None = None
    description: str = ""
    seed: int = 0
    seeds: list[int] = Field(default_factory=list)
    inputs: dict[str, str] = Field(default_factory=dict)
    params: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)


@dataclass(frozen=True)
class ResolvedStage:
    """A stage ready to run: type, validated params and wiring."""

    name: str
    spec: Stage[Any]
    params: Params
    inputs: dict[str, str]


@dataclass(frozen=True)
class ResolvedWorkflow:
    """A validated workflow with its pipeline: everything a run needs.

    ``input_paths`` are absolute; they stay in the workspace and are never logged.
    ``seeds`` lists the repeats of a multi-seed workflow (empty: one run); ``run_seed`` is
    the seed of this repeat, used by every stage that does not draw the data split.
    """

    name: str
    path: Path
    pipeline: Pipeline
    seed: int
    experiment: str
    tracking_uri: str | None
    input_paths: dict[str, Path]
    stages: tuple[ResolvedStage, ...]
    text: str
    seeds: tuple[int, ...] = ()
    run_seed: int | None = None

    def seed_of(self, stage: ResolvedStage) -> int:
        """The seed ``stage`` runs with: ``seed`` for data-split stages, else this repeat's seed."""
        return self.seed if stage.spec.data_seeded or self.run_seed is None else self.run_seed

    def repeats(self) -> list[ResolvedWorkflow]:
        """One workflow per seed of ``seeds`` (the workflow itself when it has none)."""
        return [replace(self, run_seed=seed) for seed in self.seeds] or [self]

    @property
    def digest(self) -> str:
        """sha256 of the workflow file's text."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    def redacted_text(self) -> str:
        """The workflow file as YAML with input paths and the tracking URI removed.

        Paths can name patients or sites and URIs can hold credentials: neither is logged.
        Overridden params are shown as logged (identifying values as digests).
        """
        document = yaml.safe_load(self.text)
        document["inputs"] = {name: "<path not logged>" for name in document.get("inputs", {})}
        loggable = {stage.name: stage.params.loggable() for stage in self.stages}
        if isinstance(document.get("params"), dict):
            document["params"] = {
                name: _as_logged(value, loggable.get(name, {})) for name, value in document["params"].items()
            }
        if isinstance(document.get("tracking"), dict) and "uri" in document["tracking"]:
            document["tracking"]["uri"] = "<not logged>"
        return yaml.safe_dump(document, sort_keys=False)

    def upstream_of(self, inputs: Sequence[str]) -> ResolvedWorkflow:
        """The workflow cut to the stages that produce ``inputs`` (``"<stage>.<output>"``) and their inputs.

        Raises:
            ConfigError: a reference names no stage of the workflow.

        """
        by_name = {stage.name: stage for stage in self.stages}
        needed: set[str] = set()
        pending = [reference.split(".", 1)[0] for reference in inputs]
        while pending:
            name = pending.pop()
            if name == "inputs" or name in needed:
                continue
            if name not in by_name:
                raise ConfigError(f"workflow {self.name}: no stage '{name}'{_closest(name, list(by_name))}")
            needed.add(name)
            pending.extend(source.split(".", 1)[0] for source in by_name[name].inputs.values())
        kept = tuple(stage for stage in self.stages if stage.name in needed)
        repeated = any(not stage.spec.data_seeded for stage in kept)  # else one run serves every seed
        return replace(self, stages=kept, seeds=self.seeds if repeated else ())

    def resolved_document(self) -> dict[str, Any]:
        """The resolved workflow as data: pipeline, seed and every stage's full params.

        Input paths are replaced by their names: source paths are never logged; identifying
        params (DICOM UIDs) appear as digests.
        """
        return {
            "workflow": self.name,
            "pipeline": self.pipeline.name,
            "seed": self.seed,
            **({"seeds": list(self.seeds), "run_seed": self.run_seed} if self.seeds else {}),
            "experiment": self.experiment,
            "inputs": sorted(self.input_paths),
            "stages": {
                stage.name: {
                    "uses": stage.spec.name,
                    "version": stage.spec.version,
                    "inputs": stage.inputs,
                    "params": stage.params.loggable(),
                }
                for stage in self.stages
            },
        }


def _as_logged(written: Any, logged: Any) -> Any:
    """``written`` (a workflow's params overrides) with each value taken from ``logged``."""
    if isinstance(written, dict) and isinstance(logged, dict):
        return {key: _as_logged(value, logged.get(key, value)) for key, value in written.items()}
    return logged


def _read_yaml(path: Path, what: str) -> tuple[dict[str, Any], str]:
    if not path.is_file():
        raise ConfigError(f"{what} file '{path}' not found; check the path")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path.name}{where}: invalid YAML ({exc}); fix the syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping of keys at the top level")
    return data, text


def _closest(key: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if match:
        return f"; did you mean '{match[0]}'?"
    return f"; valid keys: {', '.join(sorted(candidates))}" if candidates else ""


def _model_at(model: type[BaseModel], location: Sequence[str | int]) -> type[BaseModel] | None:
    """Follow ``location`` through nested pydantic models; ``None`` where it leaves them."""
    current: type[BaseModel] = model
    for part in location:
        field = current.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            current = annotation
        else:
            return None
    return current


def validation_message(error: ValidationError, model: type[BaseModel], prefix: str, source: str) -> str:
    """One-line message for the first error of ``error``: dotted path, cause, suggestion."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    dotted = ".".join([prefix, *location]) if prefix else ".".join(location)
    if first["type"] == "extra_forbidden":
        parent = _model_at(model, location[:-1])
        candidates = list(parent.model_fields) if parent is not None else []
        return f"{source}: unknown key '{dotted}'{_closest(location[-1], candidates)}"
    more = f" (+{len(error.errors()) - 1} more)" if len(error.errors()) > 1 else ""
    return f"{source}: '{dotted}': {first['msg']}{more}"


def _parse(model: type[_Strict], data: Mapping[str, Any], source: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, model, "", source)) from exc


def load_yaml_model(path: Path, model: type[BaseModel], what: str) -> Any:
    """Read the YAML file ``path`` into ``model``, checked like workflows.

    Raises:
        ConfigError: missing file, invalid YAML, or a wrong key or value (dotted path, cause
            and the closest valid key).

    """
    data, _text = _read_yaml(path, what)
    return _parse(model, data, path.name)


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def find_pipeline(reference: str, workflow_dir: Path) -> Path:
    """Locate a pipeline: a ``.yaml`` path relative to the workflow, or a shipped name."""
    if reference.endswith((".yaml", ".yml")):
        return (workflow_dir / reference).resolve()
    folder = shipped_dir("pipelines")
    candidate = folder / f"{reference}.yaml"
    if candidate.is_file():
        return candidate
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"pipeline '{reference}' not found{_closest(reference, names)}")


def load_pipeline(path: Path, registry: Mapping[str, Stage[Any]]) -> Pipeline:
    """Parse and check a pipeline file: stage types exist, wiring joins outputs to inputs of their kind."""
    data, _text = _read_yaml(path, "pipeline")
    pipeline: Pipeline = _parse(Pipeline, data, path.name)
    produced: dict[str, Mapping[str, Kind]] = {}
    for stage_name, stage in pipeline.stages.items():
        where = f"{path.name}: stages.{stage_name}"
        if stage.uses not in registry:
            if isinstance(registry, Registry):
                try:
                    registry.lookup(stage.uses)
                except ValueError as error:
                    raise ConfigError(f"{where}.uses: {error}") from error
            raise ConfigError(
                f"{where}.uses: unknown stage type '{stage.uses}'{_closest(stage.uses, list(registry))}"
            )
        spec = registry[stage.uses]
        missing = set(spec.inputs) - set(stage.inputs)
        if missing:
            raise ConfigError(f"{where}.inputs: missing {', '.join(sorted(missing))}")
        for input_name, source in stage.inputs.items():
            if input_name not in spec.inputs:
                raise ConfigError(
                    f"{where}.inputs.{input_name}: not an input of '{spec.name}'"
                    f"{_closest(input_name, spec.inputs)}"
                )
            origin, _, output = source.partition(".")
            if origin == "inputs":
                if output not in pipeline.inputs:
                    raise ConfigError(
                        f"{where}.inputs.{input_name}: '{source}' is not a declared pipeline input"
                    )
                kind = pipeline.inputs[output].kind
            elif origin not in produced or output not in produced[origin]:
                raise ConfigError(
                    f"{where}.inputs.{input_name}: '{source}' is not an output of an earlier stage"
                )
            else:
                kind = produced[origin][output]
            wanted = spec.inputs[input_name]
            if not kind.satisfies(wanted):
                raise ConfigError(
                    f"{where}.inputs.{input_name}: '{source}' is a {kind} but '{spec.name}' "
                    f"needs a {wanted} here; wire an output of kind {wanted}"
                )
        produced[stage_name] = spec.outputs
    return pipeline


def _unique_seeds(seeds: Sequence[int], source: str) -> tuple[int, ...]:
    """``seeds`` as given, refusing repeats (a repeated seed would only repeat a cached run)."""
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:
        raise ConfigError(f"{source}: 'seeds' lists {repeated} more than once; list each seed once")
    return tuple(seeds)


def load_workflow(path: str | Path, registry: Mapping[str, Stage[Any]]) -> ResolvedWorkflow:
    """Load, validate and resolve a workflow file before any work is done.

    Raises:
        ConfigError: unknown keys (with the dotted path and the closest valid key), invalid
            values, an unknown pipeline, or an input path that does not exist.

    """
    path = Path(path).resolve()
    data, text = _read_yaml(path, "workflow")
    workflow: Workflow = _parse(Workflow, data, path.name)
    pipeline = load_pipeline(find_pipeline(workflow.pipeline, path.parent), registry)

    for input_name in workflow.inputs:
        if input_name not in pipeline.inputs:
            raise ConfigError(
                f"{path.name}: unknown key 'inputs.{input_name}'{_closest(input_name, list(pipeline.inputs))}"
            )
    input_paths: dict[str, Path] = {}
    for input_name in pipeline.inputs:
        if input_name not in workflow.inputs:
            raise ConfigError(f"{path.name}: 'inputs.{input_name}' is required by pipeline '{pipeline.name}'")
        bound = (path.parent / workflow.inputs[input_name]).resolve()
        if not bound.exists():
            raise ConfigError(
                f"{path.name}: inputs.{input_name}: path '{workflow.inputs[input_name]}' does not exist "
                f"(resolved relative to the workflow file to {bound}); fix the path"
            )
        input_paths[input_name] = bound

    for stage_name in workflow.params:
        if stage_name not in pipeline.stages:
            raise ConfigError(
                f"{path.name}: unknown key 'params.{stage_name}'{_closest(stage_name, list(pipeline.stages))}"
            )
    stages = []
    for stage_name, stage in pipeline.stages.items():
        spec = registry[stage.uses]
        merged = _deep_merge(stage.params, workflow.params.get(stage_name, {}))
        try:
            params = spec.params.model_validate(merged)
        except ValidationError as exc:
            message = validation_message(exc, spec.params, f"params.{stage_name}", path.name)
            raise ConfigError(message) from exc
        stages.append(ResolvedStage(stage_name, spec, params, dict(stage.inputs)))

    name = workflow.name or path.stem
    return ResolvedWorkflow(
        name=name,
        path=path,
        pipeline=pipeline,
        seed=workflow.seed,
        seeds=_unique_seeds(workflow.seeds, path.name),
        experiment=workflow.tracking.experiment or name,
        tracking_uri=workflow.tracking.uri,
        input_paths=input_paths,
        stages=tuple(stages),
        text=text,
    )
