#!/usr/bin/env sh
# Debian packages the test suite drives for real (part of the README's test command and CI):
#   dicom3tools                 dciodvfy validates the DICOM SEG objects medseg writes
#   orthanc, orthanc-dicomweb   a PACS with DICOMweb, started on loopback by tests/integration/test_pacs.py
#   orthanc-python              runs medseg's auto-segmentation plugin (tests/integration/test_orthanc_autoseg.py)
#   chromium, chromium-driver   headless browser for the MLflow UI check (tests/integration/test_mlflow_ui.py)
#   dcm2niix                    the DICOM converter the field trusts: medseg's volumes are checked against it
# Installs only what is missing (as root, or through sudo). MEDSEG_SKIP_SYSTEM_PACKAGES=1 skips
# it; the tests that need a package then skip, naming it.
set -eu
[ "${MEDSEG_SKIP_SYSTEM_PACKAGES:-0}" = "1" ] && exit 0
missing=""
command -v dciodvfy >/dev/null 2>&1 || missing="$missing dicom3tools"
command -v Orthanc >/dev/null 2>&1 || missing="$missing orthanc"
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc-dicomweb"
[ -e /usr/share/orthanc/plugins/libOrthancPython.so ] || missing="$missing orthanc-python"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
command -v chromedriver >/dev/null 2>&1 || missing="$missing chromium-driver"
command -v dcm2niix >/dev/null 2>&1 || missing="$missing dcm2niix"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
echo "installing Debian packages:$missing" >&2
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
$sudo apt-get install -y --no-install-recommends $missing >/dev/null 2>&1 \
  || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends $missing >/dev/null; }
# The orthanc package starts a system service on port 8042; the tests start their own instance.
if command -v systemctl >/dev/null 2>&1; then $sudo systemctl stop orthanc >/dev/null 2>&1 || true; fi
