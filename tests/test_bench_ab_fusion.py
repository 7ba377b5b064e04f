"""benchmarks/ab_fusion.py: two versions compared in pairs, each run in its own process, in turns."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import FACES, REPO

import ab_fusion


def test_the_pairs_ratios():
    got = ab_fusion.compare([0.20, 0.22, 0.18, 0.30], [0.18, 0.20, 0.19, 0.24])
    assert got["old_s"] == pytest.approx(0.21) and got["new_s"] == pytest.approx(0.195)
    assert got["ratio_median"] == pytest.approx((0.18 / 0.20 + 0.20 / 0.22) / 2, abs=1e-3)
    assert (got["ratio_min"], got["ratio_max"]) == (0.8, 1.056)
    assert (got["pairs_new_quicker"], got["pairs"]) == (3, 4)


def test_each_version_goes_first_as_often_as_second(monkeypatch):
    old = Path("old_tree")
    calls = []
    monkeypatch.setattr(ab_fusion, "one_run", lambda tree, *a: calls.append(tree) or {"total": 1.0 if tree == old
                                                                                      else 0.5})
    out = ab_fusion.main(["--old", str(old), "--pairs", "3"])
    assert calls == [old, REPO, REPO, old, old, REPO]
    assert out["ratio_median"] == 0.5 and out["pairs_new_quicker"] == 3


def test_a_version_against_itself_on_the_shared_photos():
    """The real profile_fusion of this checkout on both sides, each in a process of its own."""
    out = ab_fusion.main(["--old", str(REPO), "--faces", str(FACES), "--pairs", "1", "--repeats", "1"])
    assert out["pairs"] == 1 and out["old_runs_s"][0] > 0 and out["new_runs_s"][0] > 0
    assert 0.3 < out["ratio_median"] < 3  # the same code: the same time, to the noise of one run
