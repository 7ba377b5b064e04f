"""Memory sized to the card, without a GPU: the plan chosen for given free memory (6, 8, 12, 24, 80 GiB and
too little), the settings it produces, explicit choices kept ('as set' only warns), SDXL and larger images
needing more, and the CPU skipping the sizing."""

from __future__ import annotations

import pytest
import torch

from facechain_core.errors import FaceChainError
from facechain_core.train import TrainSettings
from facechain_core.train.memory import GIB, MEMORY_MODES, plan_for_memory, plans, size_to_card, table

AUTO, AS_SET = MEMORY_MODES
CUDA = torch.device("cuda")  # only a label here: free memory comes from the test, no tensor goes there


@pytest.mark.parametrize("free_gib, batch, recompute", [
    (6, 4, "full"),      # 4.7 GiB needed with margin
    (8, 8, "full"),      # 5.8 GiB peak, 6.9 with margin
    (12, 4, "none"),     # the node's default: 7.75 GiB peak
    (24, 8, "none"),     # the fastest plan: 11.5 GiB peak
    (80, 8, "none"),
])
def test_plan_for_free_memory_sd15_512(free_gib, batch, recompute):
    plan = plan_for_memory(free_gib * GIB, "sd15", 512)
    assert (plan.batch_size, plan.recompute) == (batch, recompute)
    assert plan.need_gib <= free_gib
    # nothing faster would have fitted
    faster = [p for p in plans("sd15", 512) if p.ms_per_sample < plan.ms_per_sample]
    assert all(p.need_gib > free_gib for p in faster)


def test_too_little_memory_is_a_clear_error_naming_the_need():
    with pytest.raises(FaceChainError) as e:
        plan_for_memory(2 * GIB, "sd15", 512)
    msg = str(e.value)
    assert "2.0 GiB free" in msg and "needs 3.0 GiB" in msg
    for words in ("smaller image size", "close other programs", "CPU"):
        assert words in msg


def test_margin_is_data_and_peaks_include_the_unet():
    t = table()
    for plan, row in zip(sorted(t["plans"], key=lambda r: r["ms_per_sample"]), plans("sd15", 512)):
        assert plan["peak_gib"] == pytest.approx(row.peak_gib)
        assert row.need_gib == pytest.approx(row.peak_gib * (1 + t["margin_fraction"]) + t["margin_gib"])
        assert row.peak_gib > t["archs"]["sd15"]["unet_weights_gib"]


def test_bigger_images_and_sdxl_need_more_and_are_marked_estimated():
    base = {(p.batch_size, p.recompute): p for p in plans("sd15", 512)}
    for arch, size in (("sd15", 768), ("sdxl", 1024)):
        for p in plans(arch, size):
            assert p.peak_gib > base[(p.batch_size, p.recompute)].peak_gib and p.estimated
    assert plan_for_memory(12 * GIB, "sdxl", 1024).batch_size < plan_for_memory(12 * GIB, "sd15", 512).batch_size
    with pytest.raises(FaceChainError, match="Not enough GPU memory"):
        plan_for_memory(6 * GIB, "sdxl", 1024)


def test_requested_gradient_checkpointing_is_kept():
    plan = plan_for_memory(80 * GIB, "sd15", 512, TrainSettings().with_(gradient_checkpointing=True))
    assert plan.recompute == "full" and plan.batch_size == 8


def free(gib):
    return lambda needed: int(gib * GIB)


def test_auto_sets_batch_and_recomputation():
    s, line = size_to_card(TrainSettings(), "sd15", (512, 512), CUDA, AUTO, torch.nn.Linear(2, 2), free(7))
    assert (s.batch_size, s.gradient_checkpointing, s.high_res_checkpoint_tokens) == (8, True, 0)
    assert line == "memory: 7.0 GiB available: batch 8, full recomputation (gradient checkpointing), ~5.8 GiB peak"
    s, _ = size_to_card(TrainSettings(), "sd15", (512, 512), CUDA, AUTO, torch.nn.Linear(2, 2), free(11))
    assert (s.batch_size, s.gradient_checkpointing) == (4, False)
    with pytest.raises(FaceChainError, match="Not enough GPU memory"):
        size_to_card(TrainSettings(), "sd15", (512, 512), CUDA, AUTO, torch.nn.Linear(2, 2), free(1.5))


def test_high_res_plan_recomputes_the_full_resolution_blocks():
    rows = {(p.batch_size, p.recompute): p for p in plans("sd15", 768)}
    assert rows[(4, "high_res")].peak_gib > rows[(8, "full")].peak_gib  # dominated: kept in the table only
    from facechain_core.train.memory import apply_plan
    s = apply_plan(TrainSettings(), rows[(4, "high_res")], (768, 512))
    assert s.high_res_checkpoint_tokens == 96 * 64 and not s.gradient_checkpointing


def test_as_set_keeps_settings_and_only_warns():
    mine = TrainSettings().with_(batch_size=16)
    s, line = size_to_card(mine, "sd15", (512, 512), CUDA, AS_SET, torch.nn.Linear(2, 2), free(8))
    assert s is mine and line.startswith("memory WARNING: as set (batch 16, no recomputation")
    s, line = size_to_card(TrainSettings(), "sd15", (512, 512), CUDA, AS_SET, torch.nn.Linear(2, 2), free(24))
    assert s.batch_size == 4 and line.startswith("memory: as set (batch 4") and "WARNING" not in line


def test_cpu_skips_sizing():
    mine = TrainSettings()
    s, line = size_to_card(mine, "sd15", (512, 512), torch.device("cpu"), AUTO, torch.nn.Linear(2, 2))
    assert s is mine and line == "no GPU: no memory sizing"


def test_bad_memory_mode_is_a_clear_error():
    with pytest.raises(FaceChainError, match="memory must be one of"):
        size_to_card(TrainSettings(), "sd15", (512, 512), CUDA, "lots", torch.nn.Linear(2, 2), free(24))
