#!/usr/bin/env bash
# The test command of the README: installs the Debian packages the tests read if they are missing
# (scripts/test-deps.sh), builds the workspace (the plugins the integration tests load are cdylibs,
# which `cargo test` alone does not build) and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/test-deps.sh
cargo build --workspace
cargo test --workspace "$@"
