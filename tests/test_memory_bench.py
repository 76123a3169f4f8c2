"""bench/memory.py: live bytes counted as an allocator would, a step's memory linear in its rows
operation by operation, and the micro-batch a card needs."""
import numpy as np
import pytest
import torch

from test_bench_dm_step import load


def test_live_bytes_counts_each_storage_once_and_frees_it():
    memory = load("memory")
    mode = memory.LiveBytes()
    with mode:
        a = torch.ones(1000, 250)                    # 1,000,000 bytes
        view = a[:10]                                # a view: no new storage
        b = a * 2                                    # 1,000,000 more
        assert mode.live == 2_000_000
        del b
        assert mode.live == 1_000_000
        c = [torch.zeros(250) for _ in range(4)]     # 4 x 1,000
    assert mode.live == 1_004_000 and max(mode.series) == 2_000_000 and view.shape == (10, 250)
    del a, view, c


@pytest.mark.parametrize("stage, precision", [("tsm", "bf16"), ("adm", "fp32")])  # the CPU emulates bf16 slowly
def test_the_estimate_on_fake_tensors_equals_a_real_steps_peak(tmp_path, stage, precision):
    """The estimate runs msd.py's step on fake tensors (no arithmetic) at 2 and 4 rows and takes, at
    every operation, live(rows) = fixed + rows x per_row; with the CPU's autocast policy a real step
    at 6 rows reaches the same peak (its real images: a few kB the estimate counts as zeros);
    with CUDA's (GroupNorm in float32) each row costs more."""
    memory = load("memory")
    est = memory.estimate(stage, "tiny", 6, precision, tmp=str(tmp_path), cuda_groupnorm=False)  # the CPU's autocast
    real = memory.one_step(memory.files(str(tmp_path), stage, "tiny"), 6, precision, "cpu", count=True, fake_tensors=False)
    assert abs(est["peak"] - real.max()) <= 1e-4 * real.max()
    assert est["per_row"].max() > 0 and est["fixed"].min() > 0
    if precision == "bf16":  # GroupNorm in float32, as CUDA's autocast runs it: more bytes per row
        cuda = memory.estimate(stage, "tiny", 6, precision, tmp=str(tmp_path))
        assert cuda["per_row"].max() > est["per_row"].max()


def test_micro_batch_is_the_largest_divisor_that_fits_the_usable_memory():
    memory = load("memory")
    gib = 2 ** 30
    est = dict(fixed=np.array([10.0 * gib, 2.0 * gib]), per_row=np.array([1.0 * gib, 0.0]))  # peak 10 + m GiB
    # 90% of 81,559 MiB = 71.7 GiB: all 48 rows fit; of 40,536 MiB = 35.6 GiB: 25 rows do, the divisor 24
    assert memory.micro_batch_for(est, 48, 81_559) == 48
    assert memory.micro_batch_for(est, 48, 40_536) == 24
    assert memory.micro_batch_for(est, 48, 8_000) == 0  # 7 GiB: not even one row next to 10 GiB fixed
