"""benchmarks/same_pixels.py: FaceFusion of two trees on the shared photos, compared output by output."""

from __future__ import annotations

import json

import same_pixels
from bench_paths import REPO


def test_this_tree_against_itself_fuses_the_same_pixels(capsys):
    """Run twice, each in a process of its own (threads only and with two helpers): every pixel, mask and
    report line the same, and some images fused, so the comparison covers fused pixels."""
    same_pixels.main(["--old", str(REPO)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["outputs"] == 3 * sum(2 * len(images) for _, images, _ in same_pixels.CASES)
    assert result["same"] and result["differ"] == []
    assert result["fused_notes"] >= 4
