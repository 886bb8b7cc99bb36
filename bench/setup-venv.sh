#!/usr/bin/env bash
# Creates bench/.venv with the pinned Python peers (tensorflow-cpu, jax + jaxlib + optax, torch, numpy).
# Idempotent: a stamp file in the venv holds the hash of the pins; a complete venv with the same pins is left
# alone. torch comes from the CPU-only wheel index when it answers quickly, otherwise from PyPI (whose Linux
# wheel pulls in the CUDA libraries: larger, the same CPU code).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
requirements="$here/requirements.txt"
stamp="$venv/.nash-bench-stamp"
python="${NASH_BENCH_PYTHON:-}"

if [[ -z "$python" ]]; then
    for candidate in /root/.pyenv/versions/3.11.7/bin/python3 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then
            python="$(command -v "$candidate")"
            break
        fi
    done
fi
if [[ -z "$python" ]]; then
    echo "setup-venv: no python3 found; install Python 3.11 or set NASH_BENCH_PYTHON=/path/to/python3" >&2
    exit 1
fi

want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup-venv: $venv is complete (pins unchanged), nothing to do"
    exit 0
fi

echo "setup-venv: creating $venv with $python ($("$python" --version 2>&1))"
rm -f "$stamp"
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

torch_pin="$(grep -E '^torch==' "$requirements")"
echo "setup-venv: installing $torch_pin (CPU-only index first, 20 s timeout)"
if ! "${pip[@]}" --timeout 20 --retries 0 --index-url https://download.pytorch.org/whl/cpu "$torch_pin" \
    >"$venv/torch-cpu-index.log" 2>&1; then
    echo "setup-venv: the CPU-only torch index is unreachable (see $venv/torch-cpu-index.log); using PyPI's torch"
    "${pip[@]}" "$torch_pin"
fi

echo "setup-venv: installing the other pins from $requirements"
grep -vE '^torch==' "$requirements" | "${pip[@]}" -r /dev/stdin

echo "setup-venv: checking the imports"
"$venv/bin/python" - <<'EOF'
import jax, jaxlib, keras, numpy, optax, tensorflow, torch
print(f"  tensorflow {tensorflow.__version__} (keras {keras.__version__}), jax {jax.__version__}, "
      f"optax {optax.__version__}, torch {torch.__version__}, numpy {numpy.__version__}")
EOF
echo "$want" >"$stamp"
echo "setup-venv: done"
