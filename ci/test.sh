#!/usr/bin/env bash
# The test command of the README: lint, then the tests. Extra arguments go to pytest
# (e.g. `bash ci/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m ruff check .  # lint rules: [tool.ruff] in pyproject.toml
exec python3 -m pytest -q -p no:cacheprovider --timeout=900 "$@"
