"""benchmarks/profile_fusion.py's timeline: each stage of the library's fusion, and how long each step ran in it."""

from __future__ import annotations

import json

import pytest

from conftest import FACES

import profile_fusion


def test_a_stage_counts_how_long_each_step_ran_inside_it():
    ms = 0.001
    events = [  # thread, step, start, end (s)
        (1, "detect_faces_many", 0 * ms, 10 * ms),
        (1, "helper_wait", 12 * ms, 40 * ms),
        (2, "helper_wait", 20 * ms, 90 * ms),  # overlaps the first: the union counts, 12-90
        (1, "embed_faces", 95 * ms, 120 * ms),  # cut at the stage's end
        (3, "face_meshes", 200 * ms, 210 * ms),  # after the stage: not counted
    ]
    got = profile_fusion.timeline_summary(events, {"start": (0.0, 0.1)})["start"]
    assert got["wall"] == pytest.approx(100.0)
    assert got["detect_faces_many"] == pytest.approx(10.0)
    assert got["helper_wait"] == pytest.approx(78.0)
    assert got["embed_faces"] == pytest.approx(5.0)
    assert "face_meshes" not in got


def test_the_timeline_of_a_real_run_on_the_shared_photos(tmp_path, capsys):
    """The real library on the benchmark's 8 portraits, threads only: every stage is in the summary and the
    events file holds the nets' and the blends' calls."""
    from facechain_core import fusion, processes

    before = (fusion.try_rungs, fusion.fg.warp_patch, processes.wait_any, fusion.detect_faces_many)
    out = tmp_path / "timeline.json"
    profile_fusion.main(["--faces", str(FACES), "--repeats", "1", "--processes", "0", "--workers", "2",
                         "--timeline", str(out)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = result["timeline"]
    assert list(summary) == ["look", "start", "check", "finish", "rank"]
    assert summary["look"]["detect_faces_many"] > 0 and summary["look"]["face_meshes"] > 0
    assert summary["check"]["_blend_patch"] > 0 and summary["check"]["embed_faces"] > 0
    assert all(row["wall"] >= max(v for v in row.values()) - 0.2 for row in summary.values())
    assert result["tries"] > 0 and 0 < result["fused"] <= 8
    assert (fusion.try_rungs, fusion.fg.warp_patch, processes.wait_any, fusion.detect_faces_many) == before
    rows = json.loads(out.read_text())
    steps = {r["step"] for r in rows}
    assert {"_looks", "detect_faces_many", "embed_faces", "face_meshes", "try_rungs", "_after_checks"} <= steps
    assert all(r["end_ms"] >= r["start_ms"] for r in rows)
