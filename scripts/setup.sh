#!/usr/bin/env bash
# One-time, idempotent set-up used by `make demo` and `make test`:
# creates the virtual environment if missing, installs the CPU build of torch when
# no GPU is present (so pip never pulls a multi-GB CUDA build), then the project.
# The project's dependencies go in with uv when it can be installed (about 25 s instead of pip's 2 minutes
# on 2 cores: ray's resolution and byte-compilation are the cost); KD_INSTALLER=pip uses pip alone.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
HERE="$(cd "$(dirname "$0")/.." && pwd)"
STAMP="$VENV/.kd-installed"
EXTRAS="${KD_EXTRAS-test}"  # `make test` installs the test extra; `make demo` (KD_EXTRAS=) only what kd runs on
WANT="$( (cat "$HERE/pyproject.toml" "$HERE/scripts/setup.sh"; echo "extras=$EXTRAS") | sha256sum | cut -c1-16)"

if [[ "$VENV" == "system" ]]; then
  # Install into the interpreter on PATH (container images that already ship Python and Ray).
  PY="$(command -v python3 || command -v python)"
  STAMP="$(dirname "$PY")/../.kd-installed"
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    echo "kd setup: creating virtual environment in $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  exit 0
fi
PIP=("$PY" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade "pip>=24" >/dev/null
UV=()
if [[ "${KD_INSTALLER:-uv}" == "uv" ]] && "${PIP[@]}" --no-compile uv >/dev/null 2>&1; then
  UV=("$PY" -m uv pip install -q --python "$PY")
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # torch with pip: it knows this machine's pip configuration (a local wheel, an index), uv does not
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "kd setup: GPU found, installing torch (CUDA build)"
    "${PIP[@]}" --no-compile "${KD_TORCH_SPEC:-torch>=2.13.0}" ${KD_TORCH_INDEX:+--index-url "$KD_TORCH_INDEX"}
  else
    echo "kd setup: no GPU, installing the CPU build of torch"
    "${PIP[@]}" --no-compile "${KD_TORCH_SPEC:-torch==2.13.0}" ${KD_TORCH_INDEX:+--index-url "$KD_TORCH_INDEX"}
  fi
fi
TARGET="$HERE"
if [[ "$EXTRAS" == "" ]]; then
  echo "kd setup: installing kd"
else
  echo "kd setup: installing kd with extras [$EXTRAS]"
  TARGET="$HERE[$EXTRAS]"
fi
if [[ ${#UV[@]} -eq 0 ]] || ! "${UV[@]}" ${KD_EDITABLE--e} "$TARGET"; then
  [[ ${#UV[@]} -eq 0 ]] || echo "kd setup: uv failed; installing with pip"
  "${PIP[@]}" ${KD_EDITABLE--e} "$TARGET"
fi
# byte-compile what pip and uv left as source (torch, sympy, ...), in parallel: else every Ray worker process
# compiles torch._dynamo's imports again (its optimizers import it), seconds of CPU each
"$PY" -m compileall -q -j 0 "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null || true
echo "$WANT" > "$STAMP"
