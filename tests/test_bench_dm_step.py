"""bench/dm_step.py: the DM-step timer runs the real loop, also for a student smaller than its teacher."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dm_step_with_a_smaller_student(capsys):
    spec = importlib.util.spec_from_file_location("dm_step", os.path.join(ROOT, "bench", "dm_step.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    log = bench.main(["--arch", "model_channels=16,img_resolution=8,attn_resolutions=(4,)", "--student-arch",
                      "model_channels=8,img_resolution=8,attn_resolutions=(4,)", "--reg-loss", "mse", "--batch", "4",
                      "--steps", "1", "--threads", "1"])
    assert log["ms_per_iter"] > 0
    out = capsys.readouterr().out
    assert "student model_channels=8" in out and "MSE regression" in out
    try:
        bench.main(["--student-arch", "model_channels=8", "--parts"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("--parts with --student-arch was accepted")


def load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stack_mode_times_sequential_stacked_and_shared(tmp_path, capsys):
    log = load("dm_step").main(["--arch", "model_channels=16,img_resolution=8,attn_resolutions=(4,)", "--student-arch",
                                "model_channels=8,img_resolution=8,attn_resolutions=(4,)", "--reg-loss", "mse",
                                "--batch", "4", "--steps", "1", "--threads", "1", "--stack", "1", "2", "--rounds", "3",
                                "--results", str(tmp_path / "speed")])
    assert [r["K"] for r in log["stack"]] == [1, 2]
    for r in log["stack"]:  # three rounds of each timing, and the median of them
        assert all(len(v) == 3 and min(v) > 0 and sorted(v)[1] == r[k] for k, v in r["rounds"].items())
    table = (tmp_path / "speed" / "table.md").read_text()
    assert "| 2 |" in table and "]x |" in table and "median [min, max] of 3 rounds" in table
    assert (tmp_path / "speed" / "run.json").exists()
    assert "one shared fake score" in capsys.readouterr().out


def test_stack_memory_counts_parameters_and_adamw_state():
    rows = load("stack_memory").main(["--k", "4"])
    xs = [r for r in rows if r["student"] == "XS" and r["start"].startswith("the student")][0]
    assert xs["generators"] == xs["fakes"] == 4 * 85_943_555 * 12 / 2 ** 30 and xs["shared"] == xs["fakes"] / 4
    adm = [r for r in rows if r["student"] == "XXS" and "teacher" in r["start"]][0]
    assert adm["fakes"] == 4 * 295_899_267 * 12 / 2 ** 30  # the ADM stage's fake scores start from the teacher B


def test_bench_scripts_import_the_root_modules_when_run_as_scripts():
    """bench/ sits first on a bench script's path, so a bench module named like a root one (bench/fdistill.py
    once) is imported by msd.py in its place; run as a user runs them, the scripts start."""
    import subprocess
    import sys
    root = {f for f in os.listdir(ROOT) if f.endswith(".py")}
    assert not root & set(os.listdir(os.path.join(ROOT, "bench")))
    for script in ("dm_step.py", "memory.py"):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--help"], capture_output=True,
                              text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
