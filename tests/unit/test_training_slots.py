"""Admission of concurrent distributed fits: their workers' CPUs must leave the data path's free."""

import threading
import time

from pipelines.train_loop import DATA_CPUS, _TrainingSlots


def _enter_times(slots: _TrainingSlots, cpus: list[float], total: float, hold_s: float = 0.3, fit_threads: list[int] | None = None,
                 cores: int | None = None) -> list[float]:
    t0, times = time.monotonic(), [0.0] * len(cpus)

    def fit(i: int) -> None:
        with slots.hold(cpus[i], total, threads=fit_threads[i] if fit_threads else 0, cores=cores):
            times[i] = time.monotonic() - t0
            time.sleep(hold_s)

    threads = [threading.Thread(target=fit, args=(i,)) for i in range(len(cpus))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return times


def test_two_two_worker_fits_on_four_cpus_run_one_after_the_other():
    assert DATA_CPUS == 2
    times = sorted(_enter_times(_TrainingSlots(), [2, 2], total=4))
    assert times[0] < 0.1 and times[1] >= 0.25  # the second waited for the first to finish


def test_small_fits_share_the_cpus_left_beside_the_data_path():
    times = _enter_times(_TrainingSlots(), [1, 1, 1], total=4)
    assert sorted(times)[1] < 0.1 and sorted(times)[2] >= 0.25  # two at once, the third waits


def test_a_fit_larger_than_the_budget_still_runs_alone():
    times = _enter_times(_TrainingSlots(), [8, 8], total=4)
    assert sorted(times)[0] < 0.1 and sorted(times)[1] >= 0.25


def test_on_one_machine_fits_also_share_its_cores():
    """Two 1-CPU fits of 2 threads each on a 2-core machine: one after the other (side by side
    they oversubscribe the cores); on 4 cores, side by side."""
    times = sorted(_enter_times(_TrainingSlots(), [1, 1], total=4, fit_threads=[2, 2], cores=2))
    assert times[0] < 0.1 and times[1] >= 0.25
    times = sorted(_enter_times(_TrainingSlots(), [1, 1], total=4, fit_threads=[2, 2], cores=4))
    assert times[1] < 0.1
