"""curves.py: every stage's run draws curves.png from its own log; --plot overlays finished runs."""
import json

import pytest

import curves
import msd
from test_adm_tsm import common, data  # noqa: F401  (tiny real images in EDM's layout)
from test_msd import args, files  # noqa: F401  (the tiny teacher and pairs)


def logged_keys(folder):
    rows = [json.loads(line) for line in open(folder / "log.jsonl")]
    return {k for r in rows if "grad_probe" not in r for k in r}, any("grad_probe" in r for r in rows)


def expected_titles(folder):
    keys, probe = logged_keys(folder)
    return [title for k, title in curves.PANELS.items() if k in keys] + (["|grad| on G per term / the one-step loss's (probe)"] if probe else [])


def test_each_stage_draws_the_panels_of_its_own_log(files, data, tmp_path):  # noqa: F811
    teacher = str(files / "teacher.pt")
    runs = {"dm": args(files, tmp_path / "dm", "--iters", "2", "--grad-probe-every", "1"),
            "adm": ["--stage", "adm", "--teacher", teacher, "--init", teacher, "--data", data, "--iters", "2",
                    "--head-width", "32", *common(tmp_path / "adm")],
            "tsm": ["--stage", "tsm", "--teacher", teacher, "--preset", "tiny", "--arch", "model_channels=32",
                    "--data", data, "--iters", "2", *common(tmp_path / "tsm")]}
    wanted = {"dm": {"dm", "reg", "fake"}, "adm": {"dm", "gan_g", "fake", "gan_d"}, "tsm": {"tsm"}}
    for stage, argv in runs.items():
        msd.main(argv)
        folder = tmp_path / stage
        assert (folder / "curves.png").stat().st_size > 10_000, stage  # drawn by the run itself
        keys, probe = logged_keys(folder)
        assert wanted[stage] <= keys and probe == (stage == "dm")
        titles = curves.plot([str(folder)], str(folder / "again.png"))
        assert titles == expected_titles(folder), stage
        assert "learning rate" in titles and "img/s" in titles and "skipped steps (total)" in titles
    assert "GAN loss, D" not in expected_titles(tmp_path / "dm") and "TSM loss (Eq. 3)" in expected_titles(tmp_path / "tsm")
    assert any("probe" in t for t in expected_titles(tmp_path / "dm"))
    # several runs overlaid, from the command line; the union of their panels
    out = tmp_path / "both.png"
    titles = msd.main(["--plot", str(tmp_path / "dm"), str(tmp_path / "adm"), "--out", str(out)])
    assert out.stat().st_size > 10_000 and "GAN loss, G" in titles and "regression loss (Eq. 9)" in titles
    meta = json.load(open(tmp_path / "adm" / "run.json"))
    assert curves.label(str(tmp_path / "adm"), meta) == "adm: adm, student 0 of 2" and meta["batch"] == 4


def test_plot_refuses_a_folder_without_a_log(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no log.jsonl"):
        curves.plot([str(tmp_path)], str(tmp_path / "c.png"))


def test_running_mean_ignores_gaps():
    assert curves.smooth([1.0, 3.0, float("nan"), 5.0], 2).tolist() == [1.0, 2.0, 3.0, 5.0]


def test_a_zero_dm_gradient_in_the_probe_draws_a_gap_not_a_crash(tmp_path):
    """ADM from the teacher: G = fake score = teacher, so the probe's DM term is exactly 0 at first."""
    rows = [{"step": 1, "dm": 0.0, "gan_g": 0.6}, {"step": 1, "grad_probe": {"dm": 0.0, "gan_g": 1e-12}},
            {"step": 2, "dm": 0.1, "gan_g": 0.6}, {"step": 2, "grad_probe": {"dm": 0.5, "gan_g": 1e-3}}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    titles = curves.plot([str(tmp_path)], str(tmp_path / "c.png"))
    assert any("probe" in t for t in titles) and (tmp_path / "c.png").stat().st_size > 1000
