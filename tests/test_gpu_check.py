"""bench/gpu_check.py: the GPU check's CPU version runs every check (so it is known to work before a GPU exists)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_bench_dm_step import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_cpu_check_runs_every_check_and_writes_its_results(tmp_path):
    out = tmp_path / "gpu"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    items = json.load(open(out / "results.json"))["items"]
    # nothing failed or was left out, but what only CUDA has
    assert not [it for it in items if it["ok"] is False or "error" in it or it.get("status", "not run: CUDA only") != "not run: CUDA only"]
    names = [f"{it['section']}: {it['name']}" for it in items]
    for precision in ("fp32", "bf16", "fp16"):
        for run in ("dm, K = 2 separate", "dm, --all-students", "adm", "tsm"):
            assert f"pipeline: {run}, {precision}, eager" in names
    assert any(n.startswith("resume: ") for n in names) and any(n.startswith("torchrun: ") for n in names)
    assert any(n.startswith("heun: ") for n in names) and any(n.startswith("speed: DM step") for n in names)
    assert any(n.startswith("kernels: q, k, v") for n in names) and any(n.startswith("memory: ") for n in names)
    assert [it["processes"] for it in items if it["section"] == "torchrun"] == [2]  # a real comparison on a CPU
    assert [it["bit_exact"] for it in items if it["section"] == "resume"] == [True, True]
    assert all(it["first_step"]["dm"] != 0 for it in items if it["name"].startswith(("dm", "adm")))  # Eq. 6 compared
    bf16 = [it for it in items if it["section"] == "speed" and "out_vs_fp32_eager" in it]
    assert bf16 and all(it["ok"] for it in bf16)  # outputs held against fp32 eager's
    dm = [it for it in items if it["name"].startswith("dm, K = 2 separate")]
    assert all(it["fd_to_data"] > 0 and it["pixel_diff"] >= 0 for it in dm)  # routed sampling and FD ran
    run = json.load(open(out / "run.json"))
    assert run["command"].startswith("python bench/gpu_check.py --device cpu --quick") and run["quick"] is True
    assert run["versions"]["torch"] == torch.__version__.split("+")[0] and (out / "log.txt").stat().st_size > 0
    table = (out / "table.md").read_text()
    assert "## Correctness" in table and "## Speed, memory and outputs" in table and "FAIL" not in table


CHILD = """import json, os, sys, time
state, group = sys.argv[sys.argv.index("--state") + 1], sys.argv[sys.argv.index("--child") + 1]
rows = open(os.path.join(state, "rows.jsonl"), "a", buffering=1)
rows.write(json.dumps({"started": "fine"}) + "\\n")
rows.write(json.dumps(dict(section="s", name="fine", ok=True, x=1)) + "\\n")
if group == "broken":
    rows.write(json.dumps({"started": "crashing"}) + "\\n")
    sys.exit(3)
rows.write(json.dumps({"started": "slow"}) + "\\n")
time.sleep(60)
"""


def test_a_group_killed_at_its_timeout_keeps_its_finished_rows_and_names_the_item_in_flight(tmp_path):
    gc = load("gpu_check")
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ck = gc.Check(str(tmp_path / "out"), budget=8, info=dict(device="cpu", command="c", commit="x", versions={}),
                  script=str(script))
    state = tmp_path / "state"
    state.mkdir()
    ck.run_group("broken", "s", 0, [], str(state))   # exits 3 in its second item
    ck.run_group("sleepy", "s", 0, [], str(state))   # killed at the budget, in its second item
    ck.run_group("late", "s", 30, [], str(state))    # needs more than is left
    ck.save(0)
    saved = json.load(open(tmp_path / "out" / "results.json"))["items"]
    assert [(it["name"], it["ok"]) for it in saved] == [("fine", True), ("crashing", False), ("fine", True),
                                                        ("slow", None), ("late", None)]
    assert "exited with 3" in saved[1]["error"] and saved[3]["status"].startswith("killed at its timeout")
    assert saved[4]["status"].startswith("not run")
    assert "**FAIL**" in (tmp_path / "out" / "table.md").read_text()


def test_stopping_the_check_stops_its_child_and_keeps_the_finished_rows(tmp_path):
    """SIGTERM to the parent (a call's time limit, kill): the group's process is killed too (it runs in
    a session of its own, so nothing else would end it) and the rows finished so far are written."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("time.sleep(60)", "open(os.path.join(state, 'pid'), 'w').write(str(os.getpid()))\n"
                                                       "time.sleep(60)"))
    runner = tmp_path / "parent.py"
    runner.write_text(f"""import os, signal, sys, tempfile
sys.path.insert(0, {os.path.join(ROOT, 'bench')!r})
import gpu_check as gc
ck = gc.Check({str(tmp_path / 'out')!r}, 60, dict(device="cpu", command="c", commit="x", versions={{}}), script={str(script)!r})
signal.signal(signal.SIGTERM, lambda *a: sys.exit("stopped"))
try:
    ck.run_group("sleepy", "s", 0, [], {str(tmp_path)!r})
finally:
    ck.save(0)
""")
    proc = subprocess.Popen([sys.executable, str(runner)], cwd=ROOT)
    pid_file = tmp_path / "pid"
    for _ in range(600):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    child = int(pid_file.read_text())
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # gone
    saved = json.load(open(tmp_path / "out" / "results.json"))["items"]
    assert [(it["name"], it["ok"]) for it in saved] == [("fine", True)]


