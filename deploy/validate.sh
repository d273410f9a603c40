#!/usr/bin/env bash
# Validate every compose file combination with a compose implementation, offline: no Docker
# engine is needed (`config` only parses, merges, interpolates and checks the schema; it does
# not pull images, build, or check that mounted files exist).
#
#   deploy/validate.sh            # uses `docker compose` (v2) if present, else `docker-compose` (v1)
#   COMPOSE="docker-compose" deploy/validate.sh
#
# Debian/Ubuntu without Docker's compose plugin: `sudo apt-get install -y docker-compose`
# (the Python v1 implementation, 1.29.x; enough for `config`).
# Flag names are checked separately, against the real Flower CLIs, by
# tests/test_deploy_files.py.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if [[ -n "${COMPOSE:-}" ]]; then
  read -r -a compose <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose=(docker-compose)
else
  echo "validate.sh: no compose found (docker compose plugin or docker-compose)" >&2
  exit 1
fi
echo "validate.sh: using: ${compose[*]} ($("${compose[@]}" version 2>/dev/null | head -1))"

# Every overlay combination, in both orders where order could matter.
combos=(
  "compose.yml"
  "compose.yml compose.tls.yml"
  "compose.yml compose.state.yml"
  "compose.yml compose.tls.yml compose.state.yml"
  "compose.yml compose.state.yml compose.tls.yml"
)

failed=0
for combo in "${combos[@]}"; do
  args=()
  for f in $combo; do args+=(-f "$f"); done
  if out="$("${compose[@]}" "${args[@]}" config -q 2>&1)"; then
    echo "ok    $combo"
  else
    echo "FAIL  $combo"
    printf '%s\n' "$out" | sed 's/^/      /'
    failed=1
  fi
done
exit "$failed"
