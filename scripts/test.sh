#!/usr/bin/env bash
# The test command of the README: builds the workspace (the plugins the integration tests load are
# cdylibs, which `cargo test` alone does not build) and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace
cargo test --workspace "$@"
