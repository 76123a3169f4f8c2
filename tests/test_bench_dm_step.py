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
