#!/usr/bin/env bash
# Installs the Debian packages the tests read, when missing: dataset-fashion-mnist (the idx data source's
# tests and the Fashion-MNIST examples) and chromium (tests/tests/report.rs renders a run's HTML report in
# headless Chromium). Needs root (or sudo) and apt; elsewhere it says what to install and fails.
set -euo pipefail

missing=()
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if ! command -v apt-get >/dev/null 2>&1 || { [ -n "$sudo" ] && ! command -v sudo >/dev/null 2>&1; }; then
    echo "the tests need these Debian packages: ${missing[*]} (install them, then rerun)" >&2
    exit 1
fi
echo "installing ${missing[*]} (needed by the tests)" >&2
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends "${missing[@]}"
