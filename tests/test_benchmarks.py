"""Every benchmark script runs alone with ``--quick``, prints one ``ratio:`` line and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # several processes or whole runs: CI runs it, the fast loop (-m "not slow") does not

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["stage2_throughput.py", "eva02_speed.py", "encode_speed.py", "trainer_overhead.py", "scaling.py",
           "embedding_cache.py", "stream_vs_map.py", "caption_step.py", "text_checkpointing.py",
           "teacher_cost.py"]
SUITES = ["gpu_suite.py"]  # JSON lines, not one ratio: tests/test_gpu_suite.py


def test_every_script_is_covered():
    assert sorted(SCRIPTS + SUITES) == sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run(script, tmp_path):
    output = tmp_path / "result.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick", "--output", str(output)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ratio_lines = [line for line in proc.stdout.splitlines() if line.startswith("ratio:")]
    assert len(ratio_lines) == 1, proc.stdout
    assert json.loads(output.read_text())["quick"] is True
