"""The CI switch: tests that need ../shared fail instead of skipping when PTQ4VIT_REQUIRE_SHARED is set."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("require, outcome", [("", "1 skipped"), ("1", "1 error")])
def test_missing_shared_data_skips_or_fails(require, outcome, tmp_path):
    env = dict(os.environ, PTQ4VIT_SHARED=str(tmp_path / "no-shared-here"), PTQ4VIT_REQUIRE_SHARED=require,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_data.py::test_real_grayscale_imagenet_image"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert outcome in run.stdout, run.stdout[-2000:]
    assert run.returncode == (1 if require else 0)
    if require:
        assert "PTQ4VIT_REQUIRE_SHARED is set" in run.stdout
