"""scripts/experiments/teacher_table.py: the means, spreads and paired differences docs/results.md quotes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "experiments" / "teacher_table.py"


def load_script():
    spec = importlib.util.spec_from_file_location("teacher_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(metrics_by_seed: list[dict], collapsed: bool = False) -> list[dict]:
    return [{**metrics, "collapsed": collapsed} for metrics in metrics_by_seed]


def teacher(auto: str, runs: dict) -> dict:
    return {"auto": auto, "cache_minutes": 1.25,
            "teacher": {"mean_cosine": 0.5, "cra": 10.0, "centered_cra": 12.0}, **runs}


def test_means_spreads_and_paired_differences(tmp_path):
    results = {
        "raw": teacher("center", {"center": run([{"image_to_text_R@5": v} for v in (1.0, 2.0, 6.0)])}),
        # the adapter input auto chose is the one reported, not another that was also run
        "st": teacher("none", {"none": run([{"image_to_text_R@5": v} for v in (4.0, 4.0, 4.0)]),
                               "center": run([{"image_to_text_R@5": 99.0}] * 3, collapsed=True)}),
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = load_script().table(results, "raw")
    row = next(line for line in text.splitlines() if line.startswith("| image -> text R@5"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "3.0 ± 2.6"  # mean 3, sample standard deviation sqrt(7)
    assert cells[2] == "**4.0 ± 0.0**"  # the best mean is bold
    assert cells[3] == "+1.0 (+3.0, +2.0, -2.0)"  # st - raw, seed by seed
    assert "text -> image" not in text  # a metric no run has is left out, not printed as zeros
    assert "| collapsed runs | 0 | 0 |" in text  # auto's runs (none) did not collapse; the center ones did
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=True)
    assert "| st | none | 0.50 | 10.0 / 12.0 | 1.2 |" in done.stdout


def test_a_run_auto_did_not_choose_or_an_unknown_reference_is_refused():
    table = load_script().table
    results = {"raw": teacher("center", {"none": run([{"image_to_text_R@5": 1.0}])}),
               "st": teacher("none", {"none": run([{"image_to_text_R@5": 2.0}])})}
    with pytest.raises(SystemExit, match="'center', which was not run"):
        table(results, "st")
    results["raw"]["center"] = run([{"image_to_text_R@5": 3.0}])
    with pytest.raises(SystemExit, match="not among the teachers"):
        table(results, "stage1")
