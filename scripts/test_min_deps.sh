#!/usr/bin/env bash
# Run a test subset against the lowest timm that pyproject.toml allows, so that floor stays true.
# The old timm goes into its own folder inside .venv (pip --target, no dependencies) and is put
# first on PYTHONPATH; torch and everything else are the main environment's. Extra arguments go
# to pytest. CI (.ci/run) runs this after the main suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
floor=$(sed -n 's/^ *"timm>=\([0-9.]*\)".*/\1/p' pyproject.toml)
if [ -z "$floor" ]; then
    echo "test_min_deps.sh: no \"timm>=X\" line in pyproject.toml" >&2
    exit 2
fi
target=.venv/min-deps/timm-$floor
if [ ! -f "$target/timm/__init__.py" ]; then
    .venv/bin/pip install -q --no-deps --target "$target" "timm==$floor"
fi
export PYTHONPATH="$PWD/$target:$PWD${PYTHONPATH:+:$PYTHONPATH}"
got=$(.venv/bin/python -c "import timm; print(timm.__version__)")
if [ "$got" != "$floor" ]; then
    echo "test_min_deps.sh: expected timm $floor on the path, got $got" >&2
    exit 2
fi
echo "test_min_deps.sh: timm $got"
# Checkpoints (rebuild arguments, structure check), the reference searches incl. a shifted-window
# Swin, and the pooled / register-token ViT variants this timm can build.
exec .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_checkpoint.py tests/test_search_refs.py "$@"
