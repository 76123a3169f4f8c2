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


def test_held_out_digits_never_reach_the_training_folder(tmp_path):
    spec = importlib.util.spec_from_file_location("digits", os.path.join(ROOT, "bench", "digits.py"))
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    (train_x, _), (test_x, _) = digits.make_data(str(tmp_path / "train"))
    folder_x, folder_y = digits.read(str(tmp_path / "train"))  # what the teacher and TSM train on
    assert len(folder_x) == len(train_x) == 1500 and len(test_x) == 297
    seen = {x.numpy().tobytes() for x in folder_x}  # the 1,797 digits are pairwise distinct images
    assert not any(x.numpy().tobytes() in seen for x in test_x)
    assert len(seen | {x.numpy().tobytes() for x in test_x}) == 1797


def test_the_classifier_is_kept_and_reused(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("digits", os.path.join(ROOT, "bench", "digits.py"))
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    train, test = digits.make_data(str(tmp_path / "train"))
    clf, acc = digits.classifier(str(tmp_path), train, test, 1)
    assert os.path.exists(tmp_path / "classifier_e1.pt") and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    monkeypatch.setattr(digits, "train_classifier", lambda *a: (_ for _ in ()).throw(AssertionError("retrained")))
    again, acc_again = digits.classifier(str(tmp_path), train, test, 1)
    assert acc_again == acc and not again.training
    assert all((a == b).all() for a, b in zip(clf.state_dict().values(), again.state_dict().values()))
