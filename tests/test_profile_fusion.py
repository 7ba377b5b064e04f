"""benchmarks/profile_fusion.py's timeline: each image's job split into the steps it waited on."""

from __future__ import annotations

import json

import pytest

from conftest import FACES

import profile_fusion


def test_a_jobs_time_is_split_into_its_steps_and_the_rest():
    ms = 0.001
    events = [  # thread, step, start, end (s)
        (1, "detect_faces_per_thread", 0 * ms, 10 * ms),
        (1, "helper_job", 12 * ms, 40 * ms),
        (1, "embed_face", 45 * ms, 50 * ms),  # inside the try: the net's time, not the try's
        (1, "try_rung", 41 * ms, 60 * ms),
        (1, "start_and_first_try", 0 * ms, 60 * ms),
        (2, "helper_job", 20 * ms, 90 * ms),
        (2, "start_and_first_try", 10 * ms, 100 * ms),
        (3, "embed_face", 200 * ms, 210 * ms),  # after the stage: not counted
    ]
    got = profile_fusion.timeline_summary(events, (0.0, 0.1))
    assert got["images"] == 2 and got["slowest_job_ends"] == pytest.approx(100.0)
    assert got["job"] == pytest.approx(75.0)  # median of 60 and 90
    assert got["helper_job"] == pytest.approx((28 + 70) / 2)
    assert got["embed_face"] == pytest.approx(2.5) and got["try_rung"] == pytest.approx(7.0)
    assert got["none"] == pytest.approx(((60 - 10 - 28 - 5 - 14) + (90 - 70)) / 2)


def test_the_timeline_of_a_real_run_on_the_shared_photos(tmp_path, capsys):
    """The real library on the benchmark's 8 portraits, threads only: every image's job is in the summary and
    the events file holds the nets' and tries' calls."""
    from facechain_core import fusion, processes

    before = (fusion.start_and_first_try, fusion.fg.warp_patch, processes.ProcessPool.run)
    out = tmp_path / "timeline.json"
    profile_fusion.main(["--faces", str(FACES), "--repeats", "1", "--processes", "0", "--workers", "2",
                         "--timeline", str(out)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["timeline"]
    assert summary["images"] == len(profile_fusion.PORTRAITS) and summary["job"] > 0
    assert summary["slowest_job_ends"] <= summary["stage"] + 1.0
    assert (fusion.start_and_first_try, fusion.fg.warp_patch, processes.ProcessPool.run) == before  # unwrapped
    rows = json.loads(out.read_text())
    steps = {r["step"] for r in rows}
    assert {"start_and_first_try", "detect_faces_per_thread", "embed_face", "face_mesh", "try_rung"} <= steps
    assert all(r["end_ms"] >= r["start_ms"] for r in rows)
