"""``benchmarks/gpu_suite.py`` works before a GPU ever arrives: ``--quick`` on CPU writes a sane JSON line for every
part, a failing part does not stop the suite, and ``--budget-s`` skips parts and names them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # several processes or whole runs: CI runs it, the fast loop (-m "not slow") does not

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
PARTS = ["check_tower", "check_text", "check_steps", "stage2", "stage1_1b", "cache_1b", "stage2_lora_1b",
         "stage1_8b", "cache_8b", "stage2_data", "check_compile", "plan"]


def run_suite(tmp_path: Path, *options: str) -> tuple[list[dict], list[dict]]:
    """Run the suite on CPU; return the stdout JSON lines and the ``--out`` file's (which must agree)."""
    out = tmp_path / "suite.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(SUITE), "--quick", "--device", "cpu", "--out", str(out), *options],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == written
    return written, [r for r in written if r["record"] == "part"]


def configs(lines: list[dict], part: str) -> list[dict]:
    return [r for r in lines if r["record"] == "config" and r["part"] == part and r["status"] == "ok"]


def test_quick_run_writes_every_part_and_survives_a_failing_part(tmp_path):
    lines, parts = run_suite(tmp_path, "--inject-failure", "cache_8b")
    env, summary = lines[0], lines[-1]
    assert env["record"] == "env" and env["device"] == "cpu" and env["torch"] and "precision" in env
    assert summary["record"] == "summary"
    assert [p["part"] for p in parts] == PARTS
    by_name = {p["part"]: p for p in parts}
    failed = by_name.pop("cache_8b")
    assert failed["status"] == "error" and "injected" in failed["error"] and summary["failed"] == ["cache_8b"]
    assert all(p["status"] == "ok" and p["seconds"] >= 0 for p in by_name.values()), \
        {n: p.get("error") for n, p in by_name.items() if p["status"] != "ok"}
    assert summary["ok"] == [p for p in PARTS if p != "cache_8b"] and summary["skipped"] == []
    assert set(summary["goals"]) == {"stage2_mfu", "stage1_mfu_1b", "cache_plain_over_builder_1b"}
    assert all(goal["met"] is None for goal in summary["goals"].values())  # not judged on CPU

    for check in ("check_tower", "check_text", "check_steps", "check_compile"):
        assert by_name[check]["passed"] is True, by_name[check]
    assert by_name["check_tower"]["bf16_vs_cpu_fp32"]["top1_agreement"] >= 0.5
    stage2 = configs(lines, "stage2")
    assert {c["config"] for c in stage2} >= {"eva02_b8_plain", "eva02_b8_gc4", "eva02_b16_ckpt", "clip_b8_gc4"}
    for config in stage2 + configs(lines, "stage1_1b") + configs(lines, "stage1_8b") + configs(lines, "stage2_lora_1b"):
        assert config["step_s"] > 0 and config["peak_memory_gib"] >= 0 and config["mfu"] is None
        assert config["executed_flops"] >= config["model_flops"] > 0
    gradcache = next(c for c in stage2 if c["config"] == "eva02_b8_gc4")
    assert gradcache["executed_flops"] > 1.2 * gradcache["model_flops"]  # the recomputed forward is counted
    assert by_name["stage2"]["eva02_over_clip_images_per_s"] > 0
    stage1 = {c["config"]: c for c in configs(lines, "stage1_1b")}
    assert set(stage1) == {"no_ckpt", "ckpt"} and 0 < stage1["ckpt"]["tokens_per_s"]
    assert 0 <= stage1["ckpt"]["pad_fraction"] < 1 and stage1["ckpt"]["sequences"] == 3 * stage1["ckpt"]["rows"]
    cache = configs(lines, "cache_1b")
    assert all(c["plain_over_builder"] > 0 and c["forward_flops"] > 0 for c in cache if c["config"].startswith("batch"))
    assert by_name["cache_1b"]["end_to_end"]["status"] == "ok"
    assert by_name["stage2_lora_1b"]["cached_over_lora"] > 0
    assert by_name["stage2_data"]["images_per_s_per_worker"] > 0
    plan = by_name["plan"]
    assert len(plan["table"]) == 6 and "cache_8b" in plan["missing"]
    assert plan["table"][0]["hours_1_gpu"] > 0


def test_budget_skips_parts_and_names_them(tmp_path):
    lines, parts = run_suite(tmp_path, "--budget-s", "0", "--parts", "check_tower,stage2,plan")
    assert [(p["part"], p["status"]) for p in parts] == [("check_tower", "skipped"), ("stage2", "skipped"),
                                                        ("plan", "ok")]
    assert all("budget" in p["reason"] for p in parts[:2])
    summary = lines[-1]
    assert summary["skipped"] == ["check_tower", "stage2"] and summary["ok"] == ["plan"]
    assert set(parts[2]["missing"]) >= {"stage2", "stage1_1b"}
