#!/usr/bin/env bash
# Install the project and its test dependencies on a fresh machine.
# torch first and pinned: on the CI machines `torch==2.13.0` resolves to a local CPU build, while an unpinned
# torch would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --disable-pip-version-check -q "torch==2.13.0"
python3 -m pip install --disable-pip-version-check -q -c ci/constraints.txt -e ".[test,demo,train]"
