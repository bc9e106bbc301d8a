#!/usr/bin/env bash
# Wheels the H200 device machine lacks (it has no network): open_clip and its two missing needs.
# Run here (with a package registry), then name `.whl` in the device run's `carry`; gpu_check.sh
# installs whatever lies in .whl/ into /tmp/site. .whl/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
ls -la .whl
