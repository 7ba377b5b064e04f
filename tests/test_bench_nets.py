"""benchmarks/bench_nets.py on the CPU: a net's call, eight asked one by one, from eight threads and as one batch."""

from __future__ import annotations

import json

import bench_nets


def test_the_net_timings_and_the_batch_agree_with_single_calls(capsys):
    bench_nets.main(["--device", "cpu", "--repeats", "1", "--nets", "sface"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = result["sface"]
    assert result["device"] == "cpu"
    assert all(row[k] > 0 for k in ("call", "serial8", "threads8", "batch8"))
    assert row["batch_kept"] and row["batch_max_diff"] < 1e-4  # the batch's answers are the single calls'
