"""The auto-segmentation queue and configuration, without Orthanc: known answers for each rule."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from medseg.errors import ConfigError
from medseg.orthanc.config import load_config
from medseg.orthanc.jobqueue import CLAIM_GRACE_S, JobQueue, job_id, matching_rule
from tests.conftest import write_ct_export

TAGS = {"Modality": "CT", "SeriesDescription": "CT Body 3.0", "BodyPartExamined": "PARTIALBODY"}
RULES = [
    {"name": "mr", "modality": "MR", "description": None, "body_part": None},
    {"name": "body", "modality": "ct", "description": "body", "body_part": "partialbody"},
    {"name": "any-ct", "modality": "CT", "description": None, "body_part": None},
]


def test_first_matching_rule_wins_and_criteria_are_case_insensitive():
    assert matching_rule(RULES, TAGS)["name"] == "body"
    assert matching_rule(RULES, {**TAGS, "SeriesDescription": "Lung 1.0"})["name"] == "any-ct"
    assert matching_rule(RULES, {**TAGS, "Modality": "SEG"}) is None  # a SEG stored back is left alone
    assert matching_rule([], TAGS) is None


def test_a_series_is_queued_once_claimed_once_and_backs_off_on_failure(tmp_path):
    queue = JobQueue(tmp_path / "q").create()
    job, queued = queue.enqueue("orthanc-series-1", "body", TAGS)
    assert queued and job == job_id("orthanc-series-1", "body") and len(job) == 16
    assert queue.enqueue("orthanc-series-1", "body", TAGS) == (job, False)  # announced twice
    claimed = queue.claim()
    assert claimed["job"] == job and claimed["owner"]["pid"] == os.getpid()
    assert queue.claim() is None and queue.state(job) == "running"

    before = time.time()
    assert queue.retry_or_fail(claimed, "boom", attempts=3, backoff_s=10, max_backoff_s=15) == "pending"
    pending = yaml.safe_load((queue.folder("pending") / f"{job}.json").read_text())
    assert pending["attempts"] == 1 and pending["error"] == "boom" and "owner" not in pending
    assert before + 10 <= pending["not_before"] <= time.time() + 10
    assert queue.claim() is None  # not due yet
    second = queue.claim(now=pending["not_before"])
    assert queue.retry_or_fail(second, "boom", attempts=3, backoff_s=10, max_backoff_s=15) == "pending"
    third = queue.claim(now=time.time() + 15)  # 20 s doubled, capped at 15 s
    assert third is not None
    assert queue.retry_or_fail(third, "still", attempts=3, backoff_s=10, max_backoff_s=15) == "failed"
    assert queue.counts() == {"pending": 0, "running": 0, "done": 0, "failed": 1}
    assert queue.enqueue("orthanc-series-1", "body", TAGS) == (job, True)  # the series changed: again
    assert queue.counts() == {"pending": 1, "running": 0, "done": 0, "failed": 0}


def test_jobs_of_a_dead_worker_are_orphans_and_a_live_ones_are_not(tmp_path):
    queue = JobQueue(tmp_path / "q").create()
    queue.enqueue("series-a", "body", TAGS)
    claim = "from medseg.orthanc.jobqueue import JobQueue; import sys; JobQueue(sys.argv[1]).claim()"
    subprocess.run([sys.executable, "-c", claim, str(queue.root)], check=True)  # that process is gone now
    orphans = queue.orphans(lease_s=3600)
    assert [job["series"] for job in orphans] == ["series-a"]
    queue.enqueue("series-b", "body", TAGS)
    mine = queue.claim()
    assert mine["series"] == "series-b"
    assert [job["series"] for job in queue.orphans(lease_s=3600)] == ["series-a"]


def test_a_job_claimed_by_a_worker_killed_before_it_wrote_its_owner_is_an_orphan(tmp_path):
    queue = JobQueue(tmp_path / "q").create()
    job, _ = queue.enqueue("series-a", "body", TAGS)
    os.rename(queue.folder("pending") / f"{job}.json", queue.folder("running") / f"{job}.json")
    assert queue.state(job) == "running"
    started = time.monotonic()
    assert [document["job"] for document in queue.orphans(lease_s=3600)] == [job]
    assert time.monotonic() - started >= 0.9 * CLAIM_GRACE_S  # a live claimer had its grace
    queue.retry_or_fail(queue.orphans(lease_s=3600)[0], "killed", attempts=3, backoff_s=0, max_backoff_s=0)
    assert queue.state(job) == "pending" and queue.claim()["owner"]["pid"] == os.getpid()


def _config(tmp_path, **changes):
    write_ct_export(tmp_path / "export")
    document = {
        "orthanc": {"url": "http://127.0.0.1:8042"},
        "queue": "queue",
        "rules": [{"name": "ct", "model": "export", "modality": "CT"}],
    }
    document.update(changes)
    path = tmp_path / "autoseg.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_configuration_paths_resolve_beside_the_file(tmp_path):
    config = load_config(_config(tmp_path))
    assert config.queue == tmp_path / "queue" and config.rules[0].model == str(tmp_path / "export")
    assert config.orthanc.endpoint().url == "http://127.0.0.1:8042/dicom-web"
    assert config.retry.attempts == 3 and config.tracking.experiment == "orthanc-autoseg"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"queues": "q"}, "unknown key 'queues'; did you mean 'queue'"),
        (
            {"rules": [{"name": "ct", "model": "nowhere", "modality": "CT"}]},
            "rules.0.model: 'nowhere' is not an export",
        ),
        ({"rules": [{"name": "ct", "model": "export"}]}, "a rule needs modality, description or body_part"),
        ({"rules": [{"name": "ct", "model": "export", "description": "(["}]}, "not a regular expression"),
        (
            {"rules": [{"name": "a", "model": "export", "modality": "CT"}] * 2},
            "rule names must be unique: a",
        ),
        ({"orthanc": {"url": "http://user:pw@pacs:8042"}}, "credentials do not belong"),
    ],
)
def test_bad_configurations_are_refused_with_the_dotted_path(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(_config(tmp_path, **changes))
    assert str(caught.value).startswith("autoseg.yaml:") and "pw" not in str(caught.value)
