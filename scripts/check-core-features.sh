#!/usr/bin/env bash
# Checks that nash-core resolves to the same build whether cargo builds the whole workspace or one
# package (`cargo build -p nash-plugin`): every dependency of nash-core must get the same features
# both ways. Otherwise a per-package build rewrites libnash_core.so in place and every binary and
# plugin built before it fails to load. Fix a difference by enabling the workspace's features on
# that dependency in core/Cargo.toml (see the comment there). Compiles nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
features() { cargo tree "$@" -e normal,build -f '{p} [{f}]' --prefix none --no-dedupe | sed 's/ (\*)//' | sort -u; }
workspace=$(features --workspace)
core=$(features -p nash-core)
status=0
while read -r name version rest; do
    [ -n "$name" ] || continue
    in_workspace=$(grep -F "$name $version " <<<"$workspace" | head -n1)
    if [ "$in_workspace" != "$name $version $rest" ]; then
        echo "nash-core's dependency $name $version: alone $rest, in the workspace ${in_workspace#"$name $version "}"
        status=1
    fi
done <<<"$core"
if [ "$status" -eq 0 ]; then
    echo "nash-core resolves the same features alone and in the workspace"
fi
exit "$status"
