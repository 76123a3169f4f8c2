"""bench/front.py: the Pareto front by hand, and the quick pipeline (latency of each digits student size)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import front  # noqa: E402


def test_pareto_front_by_hand():
    # (latency, FD): 0 fast and bad, 1 slower and better, 2 dominated by 1, 3 ties 1's latency but better, 4 = 3
    pts = [(1.0, 80.0), (2.0, 60.0), (3.0, 70.0), (2.0, 55.0), (2.0, 55.0)]
    assert front.pareto(pts) == [0, 3, 4]


def test_front_quick_times_every_size_and_marks_a_front(capsys):
    rows, imagenet = front.main(["--quick"])
    sizes = {r["size"] for r in rows}
    assert sizes == {8, 16, 32} and not imagenet
    assert all(len(r["ms1"]) == 3 and r["ms1"][1] <= r["ms1"][0] <= r["ms1"][2] for r in rows)
    assert any(1 in r.get("front", []) for r in rows)
    assert not any(r["K"] == 1 and r["reg"] == "own" for r in rows)  # one K = 1 run serves both filters
    assert "on the front" in capsys.readouterr().out
