"""The examples under examples/ run as a user runs them (from another folder) and their loss goes down."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hope.data.sources import find_shared_data_dir

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(find_shared_data_dir() is None, reason="needs ../shared/data (the sonnets)")


def _run(script: str, tmp_path: Path, steps: int = 15) -> tuple[float, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(REPO / "examples" / script), "--steps", str(steps)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    first, last = map(float, re.search(r"loss first ([\d.]+) last ([\d.]+)", res.stdout).groups())
    return first, last


def test_plain_pytorch_example(tmp_path):
    first, last = _run("plain_pytorch.py", tmp_path)
    assert last < first - 1.0  # bytes: from ~ln 256 towards the sonnets' byte statistics


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers (pip install 'hope[hf]')")
def test_hf_memory_example(tmp_path):
    first, last = _run("hf_memory.py", tmp_path)
    assert last < first - 0.1  # only the memory trains; the random base alone stays near ln 256


def test_examples_are_short():
    for script in ("plain_pytorch.py", "hf_memory.py"):
        code = [line for line in (REPO / "examples" / script).read_text().splitlines()
                if line.strip() and not line.strip().startswith("#")]
        assert len(code) <= 50, (script, len(code))
