"""DICOMweb settings: where credentials come from, what a query asks the server."""

from __future__ import annotations

from datetime import date

import pytest
from pydantic import ValidationError

from medseg.errors import DataError
from medseg.io.dicomweb import DicomwebEndpoint, DicomwebQuery, credentials_for

URL = "https://pacs.example.org:8042/dicom-web"


def test_credentials_come_from_the_environment_first_then_netrc(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text(
        "machine pacs.example.org login alice password from-netrc\nmachine other login bob password x\n"
    )
    netrc.chmod(0o600)
    env = {"MEDSEG_NETRC": str(netrc)}
    assert credentials_for(URL, env) == ("alice", "from-netrc")
    assert credentials_for("http://elsewhere/dicom-web", env) is None
    both = {**env, "MEDSEG_DICOMWEB_USER": "carol", "MEDSEG_DICOMWEB_PASSWORD": "from-env"}
    assert credentials_for(URL, both) == ("carol", "from-env")
    with pytest.raises(DataError, match="set both"):
        credentials_for(URL, {"MEDSEG_DICOMWEB_USER": "carol"})
    assert credentials_for(URL, {"MEDSEG_NETRC": str(tmp_path / "missing")}) is None
    netrc.write_text("bogus pacs.example.org\n")
    with pytest.raises(DataError, match="malformed"):
        credentials_for(URL, env)


def test_query_filters_and_refusals():
    query = DicomwebQuery(modality="CT", date_from=date(2024, 1, 1), date_to=date(2024, 3, 31))
    assert query.search_filters() == {"Modality": "CT", "StudyDate": "20240101-20240331"}
    assert DicomwebQuery(date_from=date(2024, 1, 1)).search_filters() == {"StudyDate": "20240101-"}
    with pytest.raises(ValidationError, match="whole archive"):
        DicomwebQuery(description="liver")
    with pytest.raises(ValidationError, match="date_from is after date_to"):
        DicomwebQuery(date_from=date(2024, 2, 1), date_to=date(2024, 1, 1))
    with pytest.raises(ValidationError, match="credentials do not belong"):
        DicomwebEndpoint(url="https://alice:secret@pacs.example.org/dicom-web")
    assert DicomwebEndpoint(url=URL + "/").url == URL
