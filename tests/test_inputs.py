"""bench/inputs.py: a study's fixed inputs travel intact, and unpacking never mixes in another teacher's files."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import inputs  # noqa: E402


def fill(root, teacher=b"teacher weights"):
    files = {"digits/teacher/student.pt": teacher, "digits/pairs.npz": b"pairs", "digits/classifier_e30.pt": b"clf",
             "capacity/teacher_samples/dataset.json": b"{}", "capacity/teacher_samples/img0.png": b"png",
             "capacity/teacher_floor/dataset.json": b"{}", "capacity/c8/tsm/K1p0/student.pt": b"tsm",
             "capacity/c8/tsm/K1p0/student.pt.cpu_s": b"12.0", "capacity/c8/tsm/K10p3/student.pt": b"tsm3"}
    for name, data in files.items():
        os.makedirs(os.path.dirname(root / name), exist_ok=True)
        (root / name).write_bytes(data)
    (root / "capacity/c8/seed0").mkdir(parents=True)
    (root / "capacity/c8/seed0/student.pt").write_bytes(b"a student: not an input")
    return files


def test_pack_then_unpack_gives_the_same_files_and_refuses_another_teachers(tmp_path):
    files = fill(tmp_path / "a")
    archive = str(tmp_path / "inputs.tar.gz")
    inputs.main(["pack", archive, "--digits", str(tmp_path / "a/digits"), "--out", str(tmp_path / "a/capacity")])
    b = tmp_path / "b"
    manifest = inputs.main(["unpack", archive, "--digits", str(b / "digits"), "--out", str(b / "capacity")])
    assert sorted(manifest) == sorted(files)
    assert all((b / name).read_bytes() == data for name, data in files.items())
    assert not (b / "capacity/c8/seed0").exists()
    inputs.main(["unpack", archive, "--digits", str(b / "digits"), "--out", str(b / "capacity")])  # the same files: fine
    (b / "digits/teacher/student.pt").write_bytes(b"another teacher")
    with pytest.raises(FileExistsError, match="student.pt"):
        inputs.main(["unpack", archive, "--digits", str(b / "digits"), "--out", str(b / "capacity")])
    assert (b / "digits/teacher/student.pt").read_bytes() == b"another teacher"
    with pytest.raises(FileExistsError, match="students' runs"):  # runs of another teacher would be reused
        inputs.main(["unpack", archive, "--digits", str(tmp_path / "c/digits"), "--out", str(tmp_path / "a/capacity")])


def test_pack_names_what_is_missing(tmp_path):
    fill(tmp_path)
    os.remove(tmp_path / "digits/pairs.npz")
    with pytest.raises(FileNotFoundError, match="pairs.npz"):
        inputs.pack(str(tmp_path / "x.tar.gz"), str(tmp_path / "digits"), str(tmp_path / "capacity"))
    (tmp_path / "digits/pairs.npz").write_bytes(b"pairs")
    os.remove(tmp_path / "capacity/c8/tsm/K10p3/student.pt")  # a TSM start not finished
    with pytest.raises(FileNotFoundError, match="K10p3/student.pt"):
        inputs.pack(str(tmp_path / "x.tar.gz"), str(tmp_path / "digits"), str(tmp_path / "capacity"))
    with pytest.raises(SystemExit):
        inputs.main(["unpack", str(tmp_path / "none.tar.gz")])
