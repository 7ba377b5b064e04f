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


def test_first_runs_time_each_case_in_fresh_processes_both_ways(capsys):
    bench_nets.main(["--device", "cpu", "--repeats", "1", "--first-runs"])
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["first_runs"]
    assert set(runs) == set(bench_nets.CONV_PATHS)
    for path, rows in runs.items():
        assert [(r["net"], r["batch"], r["side"]) for r in rows] == list(bench_nets.FIRST_RUN_CASES)
        for r in rows:
            assert len(r["first_runs_ms"]) == 3 and min(r["first_runs_ms"]) > 0 and r["call_ms"] > 0
            # the same net on the same images, its input laid out two ways: the same outputs but for rounding
            assert r["max_rel_diff"] < 1e-4, (path, r)
