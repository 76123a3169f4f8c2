"""bench/digits.py --quick: the whole pipeline (teacher -> pairs -> K students -> routing -> metric) runs."""
import importlib.util
import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_quick_pipeline_gives_finite_metrics(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("digits", os.path.join(ROOT, "bench", "digits.py"))
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    rows = digits.main(["--quick", "--out", str(tmp_path)])
    assert "meaningless at this size" in capsys.readouterr().out
    assert sorted(r["K"] for r in rows) == [1, 2, 5]
    assert all(np.isfinite([r["fd_data"], r["fd_teacher"], r["acc"]]).all() for r in rows)
    assert len([d for d in os.listdir(tmp_path / "seed0" / "K5") if d.startswith("p")]) == 5  # five students
    assert len(os.listdir(tmp_path / "seed0" / "K5" / "samples")) == 100 + 1  # routed PNGs + dataset.json
