#!/usr/bin/env bash
# Installs everything collat needs on a fresh Debian/Ubuntu machine and builds the extension.
# Safe to run again: installed pieces are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."

# Real sounds for the embedded data set: the FluidR3 GM soundfont and libfluidsynth (docs/design.md §5).
if [ ! -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ] || ! ldconfig -p | grep -q libfluidsynth; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fluid-soundfont-gm libfluidsynth3 >/dev/null
fi

# torch first, with the three packages that pin it in the same command (otherwise pip swaps torch for a
# CPU build), and the build tools: the extension is compiled against this torch (--no-build-isolation).
python3 -m pip install -q "setuptools>=70" wheel ninja \
  torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0 open_clip_torch==3.3.0

# nvcc lives in /usr/local/cuda; without CUDA_HOME torch guesses /usr/local and cannot link.
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# The rest of the run-time dependencies (setup.py's INSTALL_REQUIRES: transformers, webdataset, pyfluidsynth,
# tensorboard, pyyaml, ...) and the test tools ([dev]) come from setup.py, the one list of them.
python3 -m pip install -q --no-build-isolation -e ".[dev]"
python3 -c "import collat.ops._ext as e; assert e.HAS_EXTENSION, e.EXTENSION_ERROR; print('collat._C built')"
