#!/usr/bin/env bash
# The side-by-side speed benchmark in one command:
#   bench/run.sh [--quick] [--curve] [--rounds N] [--threads 1,2] [--workloads autoencoder,mlp_gan,dcgan]
# Sets up bench/.venv (the Python peers), builds nash in release mode, then measures nash and TensorFlow, JAX
# and PyTorch one process at a time, each pinned with taskset, and prints the markdown tables; the records
# and the report go to bench/results/<timestamp>.{json,md}. See bench/README.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

usage() {
    echo "usage: bench/run.sh [--quick] [--curve] [--rounds N] [--threads 1,2] [--workloads autoencoder,mlp_gan,dcgan]" >&2
}

args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick | --curve) args+=("$1"); shift ;;
        --threads | --workloads | --rounds)
            if [[ $# -lt 2 ]]; then
                echo "run.sh: $1 needs a value" >&2
                usage
                exit 2
            fi
            args+=("$1" "$2"); shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument '$1'" >&2; usage; exit 2 ;;
    esac
done

for tool in taskset cargo python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "run.sh: '$tool' is required but not on PATH (taskset: util-linux; cargo: rustup; python3 >= 3.10)" >&2
        exit 1
    fi
done
ncpu="$(nproc)"
if [[ "$ncpu" -lt 2 ]]; then
    echo "run.sh: note: this machine has $ncpu CPU; 2-thread measurements will fail to pin (use --threads 1)" >&2
fi

system_python="$(command -v python3)"
runner=("$system_python" "$here/runner.py" --nash "$repo/target/release/nash" --python "$here/.venv/bin/python"
    --results "$here/results" "${args[@]+"${args[@]}"}")
"${runner[@]}" --dry-run >/dev/null # checks the arguments before the long steps

echo "== setting up the Python peers (bench/.venv)" >&2
if ! "$here/setup-venv.sh" >&2; then
    echo "run.sh: warning: bench/setup-venv.sh failed; the peers that cannot be imported are reported as n/a" >&2
fi

echo "== building nash (cargo build --release)" >&2
(cd "$repo" && cargo build --release >&2)

echo "== measuring (one process at a time)" >&2
exec "${runner[@]}"
