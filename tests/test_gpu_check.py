"""bench/gpu_check.py: the GPU check's CPU version runs every check (so it is known to work before a GPU exists)."""
import json
import os
import subprocess
import sys

from test_bench_dm_step import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_cpu_check_runs_every_check_and_writes_its_results(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    items = json.load(open(out / "results.json"))["items"]
    assert not [it for it in items if it["ok"] is False or "error" in it or "status" in it]  # nothing failed or left out
    names = [f"{it['section']}: {it['name']}" for it in items]
    for precision in ("fp32", "bf16", "fp16"):
        for run in ("dm, K = 2 separate", "dm, --all-students", "adm", "tsm"):
            assert f"pipeline: {run}, {precision}, eager" in names
    assert any(n.startswith("resume: ") for n in names) and any(n.startswith("torchrun: ") for n in names)
    assert any(n.startswith("heun: ") for n in names) and any(n.startswith("speed: DM step") for n in names)
    dm = [it for it in items if it["name"].startswith("dm, K = 2 separate")]
    assert all(it["fd_to_data"] > 0 and it["pixel_diff"] >= 0 for it in dm)  # routed sampling and FD ran
    run = json.load(open(out / "run.json"))
    assert run["command"].startswith("python bench/gpu_check.py --device cpu --quick") and run["quick"] is True
    table = (out / "table.md").read_text()
    assert "## Correctness" in table and "## Speed and memory" in table and "FAIL" not in table


def test_a_broken_check_fails_and_one_over_budget_is_recorded_as_not_run(tmp_path):
    gc = load("gpu_check")
    ck = gc.Check(str(tmp_path), budget=60, info={})
    ck.run("s", "broken", lambda: 1 / 0)
    ck.run("s", "too long", lambda: (True, {}), need=120)
    ck.run("s", "fine", lambda: (True, {"x": 1}))
    saved = json.load(open(tmp_path / "results.json"))["items"]
    assert [(it["name"], it["ok"]) for it in saved] == [("broken", False), ("too long", None), ("fine", True)]
    assert "ZeroDivisionError" in saved[0]["error"] and saved[1]["status"].startswith("not run")
