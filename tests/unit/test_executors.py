"""The executor's checks that need no cluster: what a Ray cluster must offer, what travels to it."""

from __future__ import annotations

import pytest

from medseg.errors import ConfigError
from medseg.inference.executors import CaseJob, ExecutorParams, _check_fits, case_files


def test_workers_that_cannot_all_be_placed_are_refused_with_the_numbers():
    _check_fits({"CPU": 4.0, "GPU": 1.0}, ExecutorParams(kind="ray", workers=2, gpus_per_worker=0.5))
    with pytest.raises(ConfigError, match=r"offers 2 CPUs; 4 worker\(s\) × 1 CPU need 4: lower executor"):
        _check_fits({"CPU": 2.0}, ExecutorParams(kind="ray", workers=4))
    with pytest.raises(ConfigError, match=r"offers 0 GPUs; 1 worker\(s\) × 1 GPU need 1"):
        _check_fits({"CPU": 8.0}, ExecutorParams(kind="ray", workers=1, gpus_per_worker=1))


def test_case_files_travel_under_pseudonymous_names(tmp_path):
    image = tmp_path / "DOE^JOHN 1970.nii.gz"
    image.write_bytes(b"nifti")
    series = tmp_path / "DOE^JOHN series"
    (series / "sub").mkdir(parents=True)
    (series / "IM_DOE_2.dcm").write_bytes(b"second")
    (series / "sub" / "IM_DOE_1").write_bytes(b"first")
    assert case_files(CaseJob("case_0001", image)) == {"image.nii.gz": b"nifti"}
    assert case_files(CaseJob("case_0002", series)) == {"000001.dcm": b"second", "000002.dcm": b"first"}
