#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint first (configured in pyproject.toml): an unused import or undefined name fails CI.
.venv/bin/ruff check ptq4vit tests benchmarks examples
exec .venv/bin/python -m pytest -q "$@"
