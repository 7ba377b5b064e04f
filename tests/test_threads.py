"""The thread pools: results in order, OpenCV single-threaded only while a pool runs, the host's setting back."""

from __future__ import annotations

import threading

import cv2

from facechain_core.threads import opencv_one_thread, parallel_map


def test_pool_keeps_order_and_runs_opencv_single_threaded_while_it_runs():
    before = cv2.getNumThreads()
    seen = []

    def job(i):
        seen.append(cv2.getNumThreads())
        return i * i

    assert list(parallel_map(job, list(range(12)), workers=3)) == [i * i for i in range(12)]
    assert set(seen) == {1}
    assert cv2.getNumThreads() == before


def test_overlapping_pools_restore_the_setting_when_the_last_one_ends():
    cv2.setNumThreads(2)
    inner_done, release = threading.Event(), threading.Event()

    def other_pool():
        with opencv_one_thread():
            inner_done.set()
            release.wait(5)

    t = threading.Thread(target=other_pool)
    with opencv_one_thread():
        t.start()
        assert inner_done.wait(5)
    assert cv2.getNumThreads() == 1  # the other pool still runs
    release.set()
    t.join(5)
    assert cv2.getNumThreads() == 2
