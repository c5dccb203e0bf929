#!/usr/bin/env bash
# The test command of the README. Extra arguments go to pytest (e.g. `bash ci/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q -p no:cacheprovider --timeout=900 "$@"
