"""The auto-segmentation configuration (YAML, data only), checked like workflows.

::

    orthanc: {url: "http://127.0.0.1:8042"}     # REST root; DICOMweb at url + /dicom-web
    queue: /var/lib/medseg/queue                 # shared with the Orthanc plugin (Medseg.Queue)
    workspace: /var/lib/medseg/workspace         # cache and embedded MLflow store of the worker
    tracking: {experiment: orthanc-autoseg}      # uri: a tracking server (default: workspace)
    retry: {attempts: 3, backoff_s: 30, max_backoff_s: 1800}
    rules:                                       # first match wins
      - name: ct-body
        model: models:/ct-body@champion          # or an export folder
        modality: CT
        description: "abdomen|thorax"            # regex on SeriesDescription, case-insensitive
        body_part: CHEST                         # BodyPartExamined

Relative paths are relative to the configuration file. Credentials for Orthanc come from
``MEDSEG_DICOMWEB_USER``/``MEDSEG_DICOMWEB_PASSWORD`` or a netrc file, never from this file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from medseg.errors import ConfigError
from medseg.io.dicomweb import DicomwebEndpoint
from medseg.orthanc.jobqueue import JobQueue
from medseg.params import Params
from medseg.runner.spec import load_yaml_model


class OrthancServer(Params):
    """Orthanc's REST root (``url``) and where its DICOMweb plugin answers below it."""

    url: str = Field(pattern=r"^https?://")
    dicomweb: str = "/dicom-web"
    timeout_s: float = Field(30.0, gt=0)

    @field_validator("url")
    @classmethod
    def _plain(cls, url: str) -> str:
        return DicomwebEndpoint(url=url).url  # refuses credentials in the URL, strips the slash

    def endpoint(self) -> DicomwebEndpoint:
        """The DICOMweb endpoint the worker fetches from and stores into."""
        return DicomwebEndpoint(url=f"{self.url}{self.dicomweb}", timeout_s=self.timeout_s)


class RouteRule(Params):
    """Which series a model segments: criteria on the series' tags (all given must hold)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str
    modality: str | None = None
    description: str | None = None
    body_part: str | None = None

    @field_validator("description")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from exc
        return pattern

    @model_validator(mode="after")
    def _narrow(self) -> RouteRule:
        if not (self.modality or self.description or self.body_part):
            raise ValueError("a rule needs modality, description or body_part (it would match every series)")
        return self

    def criteria(self) -> dict[str, Any]:
        """What the Orthanc plugin matches on (no model: the plugin only routes)."""
        return self.model_dump(include={"name", "modality", "description", "body_part"})


class RetryParams(Params):
    """Attempts per job and the back-off between them (doubling from ``backoff_s``)."""

    attempts: int = Field(3, ge=1)
    backoff_s: float = Field(30.0, ge=0)
    max_backoff_s: float = Field(1800.0, ge=0)


class AutosegTracking(Params):
    """MLflow experiment of the jobs, and a tracking server (default: the workspace's store)."""

    experiment: str = "orthanc-autoseg"
    uri: str | None = None


class AutosegConfig(Params):
    """Orthanc, the job queue, the worker's workspace, tracking, retries and routing rules."""

    orthanc: OrthancServer
    queue: Path
    workspace: Path = Path(".medseg")
    tracking: AutosegTracking = Field(default_factory=AutosegTracking)
    retry: RetryParams = Field(default_factory=RetryParams)
    lease_s: float = Field(6 * 3600.0, gt=0)
    poll_s: float = Field(2.0, gt=0)
    rules: list[RouteRule] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> AutosegConfig:
        names = [rule.name for rule in self.rules]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"rule names must be unique: {', '.join(repeated)}")
        return self

    def open_queue(self) -> JobQueue:
        """The job queue (created if new) with this configuration's rules published to the plugin."""
        queue = JobQueue(self.queue).create()
        queue.publish_rules([rule.criteria() for rule in self.rules])
        return queue

    def rule(self, name: str) -> RouteRule | None:
        """The rule called ``name``, if configured."""
        return next((rule for rule in self.rules if rule.name == name), None)


def load_config(path: str | Path) -> AutosegConfig:
    """Read and check an auto-segmentation configuration; paths resolved against its folder.

    Raises:
        ConfigError: a wrong key or value (dotted path and fix), or a rule's export folder
            that does not hold a medseg export.

    """
    path = Path(path)
    config: AutosegConfig = load_yaml_model(path, AutosegConfig, "auto-segmentation configuration")
    here = path.resolve().parent
    rules = []
    for index, rule in enumerate(config.rules):
        if not rule.model.startswith(("models:/", "runs:/")):
            folder = (here / rule.model).resolve()
            if not (folder / "model_card.json").is_file():
                raise ConfigError(
                    f"{path.name}: rules.{index}.model: '{rule.model}' is not an export folder "
                    "(no model_card.json); give the export stage's output or a models:/ URI"
                )
            rule = rule.model_copy(update={"model": str(folder)})
        rules.append(rule)
    return config.model_copy(
        update={"queue": here / config.queue, "workspace": here / config.workspace, "rules": rules}
    )
