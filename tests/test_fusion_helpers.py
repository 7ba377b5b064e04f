"""FaceFusion's helper processes (facechain_core/processes.py): the warp, colour work and blends of each image
run in lasting child processes on hosts with cores to spare. The pictures must not change (the same bytes
as in threads, on the real photos), a broken or missing helper must only cost speed, and a helper's error
reaches the caller as the pack's own error. Through the real host: a ComfyUI started with
FACECHAIN_FUSION_PROCESSES=2 fuses with two helpers, the same pixels as the threads of the session's host,
and its helpers end with it.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FACES, input_folder_of, png_arrays
from facechain_core import fusion as fu
from facechain_core import processes
from facechain_core.errors import FaceChainError, ModelMissingError
from facechain_core.images import load_photo
from test_fusion import fusion_prompt

SAME = ["obama/obama2.jpg", "obama/obama3.jpg", "rose_leslie/rose2.jpg", "katy_perry/img26.jpg",
        "katy_perry/img42.jpg"]
CROSS = ["biden/biden1.jpg", "biden/biden2.jpg", "rose_leslie/rose1.jpg"]


def photos(rels: list[str]) -> list[np.ndarray]:
    return [load_photo(FACES / rel) for rel in rels]


def pool_key(n: int) -> tuple:
    """The key fusion's pool of ``n`` helpers is held under (its shape from data/fusion.json)."""
    return (n, fu.fg.settings_data()["helper_processes"]["opencv_threads"], ("fusion",))


@pytest.fixture(scope="module")
def helpers():
    pool = fu.helper_pool(fu.FusionSettings(processes=2))
    assert pool.wait(120) == 2, "two helper processes should start"
    yield pool
    pool.close()
    processes._pools.pop(pool_key(2), None)


def test_messages_carry_arrays_and_nested_data_both_ways():
    data = ("x", 3.5, [np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 3), np.uint8)],
            {"a": np.full((5, 7, 3), 9, np.uint8)[:, ::2]}, None)  # a strided view travels as a copy
    stream = io.BytesIO()
    processes.send(stream, data)
    processes.send(stream, "second")
    stream.seek(0)
    back = processes.receive(stream)
    assert back[0] == "x" and back[1] == 3.5 and back[4] is None
    assert np.array_equal(back[2][0], data[2][0]) and back[2][0].dtype == np.float32
    assert back[2][1].shape == (0, 3)
    assert np.array_equal(back[3]["a"], data[3]["a"])
    assert processes.receive(stream) == "second"
    with pytest.raises(EOFError):
        processes.receive(stream)


def test_fusion_in_helpers_gives_the_same_bytes_as_in_threads(helpers):
    """Same person and cross person, every image's pixels, mask and report line identical either way."""
    template = load_photo(FACES / "obama/obama1.jpg")
    images = photos(SAME + CROSS)
    before = helpers.remote_jobs
    in_threads = fu.fuse_images(images, template, fu.FusionSettings(processes=0))
    in_helpers = fu.fuse_images(images, template, fu.FusionSettings(processes=2))
    assert helpers.remote_jobs - before >= sum(f.level != "skip" for f in in_helpers.images) > 0
    for rel, a, b in zip(SAME + CROSS, in_threads.images, in_helpers.images):
        assert a.note == b.note, rel
        assert np.array_equal(a.image, b.image), f"{rel}: pixels differ between threads and helpers"
        assert np.array_equal(a.mask, b.mask), rel
    assert any(f.fused for f in in_helpers.images)


def test_a_helper_error_is_the_pack_error_and_other_errors_carry_the_helper_trace(helpers):
    with pytest.raises(FaceChainError, match="template"):
        helpers.run("images:as_rgb_uint8", np.zeros((4, 4, 7), np.uint8), "template")
    with pytest.raises(RuntimeError, match="in a helper process"):
        helpers.run("fusion:warped_blends", *[None] * 10)
    with pytest.raises(ModelMissingError, match="gone"):
        processes._raise_again("ModelMissingError", "gone", "")  # the pack's errors by their own class
    assert helpers.ready == 2, "an error in a job leaves its helper working"


def test_only_plain_data_crosses_and_a_refusal_leaves_the_helpers_working(helpers):
    """The pack's own objects would not load on the other side (the host names the package differently):
    they are refused before they are sent, and an answer that is one comes back as an error."""
    with pytest.raises(TypeError, match="plain data"):
        helpers.run("fusion:helper_processes", fu.FusionSettings())
    with pytest.raises(RuntimeError, match="TypeError in a helper process"):
        helpers.run("fusion:FusionSettings")
    assert helpers.ready == 2
    card = np.full((6, 5, 3), 7, np.uint8)
    before = helpers.remote_jobs
    assert np.array_equal(helpers.run("images:as_rgb_uint8", card, "card"), card)  # still answering
    assert helpers.remote_jobs == before + 1
    with pytest.raises(FaceChainError, match="processes -2"):
        fu.fuse_images([np.zeros((8, 8, 3), np.uint8)], np.zeros((8, 8, 3), np.uint8), fu.FusionSettings(processes=-2))


def _blend_job(n_tries: int) -> tuple:
    """warped_blends' arguments for obama1 fused into obama2, with ``n_tries`` tries of the ladder's first."""
    s = fu.FusionSettings(processes=0)
    tpl = fu._looks(["tpl"], [load_photo(FACES / "obama/obama1.jpg")], s)[0]
    rgb = load_photo(FACES / "obama/obama2.jpg")
    faces, tgt, vec = fu._looks(["img"], [rgb], s)[0]
    job = fu.start_fusing(rgb, faces, tpl, s, tgt, vec)
    region, k = job.ladder[0]
    x0, y0, x1, y1 = job.roi
    args = (rgb[y0:y1, x0:x1].copy(), rgb.shape, tpl.image, tpl.shape.points, tpl.triangles, tgt.points,
            tgt.presence, job.roi, fu.asdict(s), [(region, k)] * n_tries)
    return args, job


def test_a_job_in_parts_sends_each_part_as_it_is_made(helpers):
    """``run_parts``: the helper's generator job comes back part by part (the first try's blend before the
    others are made), the same bytes as made here; the helper is free again after the last part; asked for
    whole (``run``) such a job is the list of its parts."""
    args, job = _blend_job(3)
    before = helpers.remote_jobs
    parts = helpers.run_parts("fusion:warped_blends", *args)
    assert isinstance(parts, processes.Parts)
    assert processes.wait_any([(parts, 0)], 60) and parts.has(0)
    assert not processes.wait_any([(processes.Parts(), 0)], 0.05)  # a part that never comes: the timeout
    here = list(fu.warped_blends(*args))
    for i in range(3):
        patch, mask = parts.get(i)
        assert np.array_equal(patch, here[i][0]) and np.array_equal(mask, here[i][1])
    assert parts.has(3)  # the job ended: asking answers at once
    with pytest.raises(IndexError, match="3 parts"):
        parts.get(3)
    assert helpers.remote_jobs == before + 1 and helpers.ready == 2
    whole = helpers.run("fusion:warped_blends", *args)
    assert len(whole) == 3 and np.array_equal(whole[2][0], here[2][0])


def test_an_error_in_a_job_in_parts_reaches_the_caller_and_leaves_the_helper(helpers):
    parts = helpers.run_parts("fusion:warped_blends", *[None] * 10)
    with pytest.raises(RuntimeError, match="in a helper process"):
        parts.get(0)
    assert helpers.ready == 2


def test_a_helper_killed_during_a_job_in_parts_leaves_the_rest_to_the_caller(monkeypatch):
    """The helper dies while it makes the parts: the parts not sent raise HelperBroke, and an image's try
    then blends here, the same bytes as a helper makes."""
    args, job = _blend_job(40)  # ~40 blends: the helper is still at work when it is killed
    pool = processes.ProcessPool(1, preload=("fusion",))
    assert pool.wait(120) == 1
    try:
        parts = pool.run_parts("fusion:warped_blends", *args)
        os.kill(pool._helpers[0].proc.pid, signal.SIGKILL)
        with pytest.raises(processes.HelperBroke):
            parts.get(39)
        assert pool.ready == 0
        job.parts, job.shared, job.ladder = parts, None, [job.ladder[0]] * 40
        want = next(fu.warped_blends(*args))
        patch, mask = job.patch(39, args[-1][0][1])
        assert job.parts is None and job.shared is not None  # made here after the helper broke
        assert np.array_equal(patch, want[0]) and np.array_equal(mask, want[1])
    finally:
        pool.close()


def test_no_helper_ready_means_the_job_runs_in_the_calling_thread():
    pool = processes.ProcessPool(1, preload=("fusion",))
    pool._started = True  # as if still starting, one helper ready but busy: the caller does not wait for it
    pool._alive = 1
    card = np.full((6, 5, 3), 7, np.uint8)
    assert np.array_equal(pool.run("images:as_rgb_uint8", card, "card"), card)
    assert pool.run("images:as_rgb_uint8", card, "card", fallback=lambda: "the thread's own way") == \
        "the thread's own way"  # fusion's: the lazy blends, not every try's
    assert pool.remote_jobs == 0


def test_a_killed_helper_costs_only_speed(monkeypatch):
    template = load_photo(FACES / "obama/obama1.jpg")
    images = photos(SAME[:3])
    pool = processes.ProcessPool(2, preload=("fusion",))
    assert pool.wait(120) == 2
    try:
        expected = fu.fuse_images(images, template, fu.FusionSettings(processes=0))
        for helper in pool._helpers:  # both die: every job still completes, in threads
            os.kill(helper.proc.pid, signal.SIGKILL)
            helper.proc.wait(10)
        monkeypatch.setitem(processes._pools, pool_key(2), pool)
        got = fu.fuse_images(images, template, fu.FusionSettings(processes=2))
        assert pool.ready == 0 and pool.remote_jobs == 0
        for a, b in zip(expected.images, got.images):
            assert a.note == b.note and np.array_equal(a.image, b.image)
    finally:
        pool.close()


def test_how_many_helpers(monkeypatch):
    monkeypatch.delenv("FACECHAIN_FUSION_PROCESSES", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert fu.helper_processes(fu.FusionSettings()) == 0  # few cores: threads only
    assert fu.helper_pool(fu.FusionSettings()) is None
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert fu.helper_processes(fu.FusionSettings()) == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert fu.helper_processes(fu.FusionSettings()) == 8  # at most max
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert fu.helper_processes(fu.FusionSettings()) == 0  # a bundled executable: no Python to start helpers
    monkeypatch.delattr(sys, "frozen")
    monkeypatch.setenv("FACECHAIN_FUSION_PROCESSES", "0")
    assert fu.helper_processes(fu.FusionSettings()) == 0
    assert fu.helper_processes(fu.FusionSettings(processes=3)) == 3  # the setting wins
    monkeypatch.setenv("FACECHAIN_FUSION_PROCESSES", "many")
    with pytest.raises(FaceChainError, match="FACECHAIN_FUSION_PROCESSES"):
        fu.helper_processes(fu.FusionSettings())


def helper_pids(server_pid: int) -> list[int]:
    """The host's child processes that are FaceChain helpers (from /proc)."""
    pids = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if b"facechain_core.processes import serve" in cmd:
                pids.append(int(child))
    return pids


@pytest.mark.skipif(not Path(f"/proc/self/task/{os.getpid()}/children").exists(),
                    reason="reads the host's children from /proc")
def test_through_the_host_helpers_fuse_the_same_pixels_and_end_with_it(client, comfy_base, tmp_path, monkeypatch):
    from comfy_host import ComfyClient, ComfyServer

    targets = input_folder_of(comfy_base, "helpers_targets", SAME[:2] + CROSS[:1])
    template = input_folder_of(comfy_base, "fuse_template", ["obama/obama1.jpg"])
    threads_out = client.run(fusion_prompt(targets, template, prefix="threads"))
    expected = png_arrays(client.output_images(threads_out, "4"))
    base = tmp_path / "host2"  # its own temp/ and output/ (a host empties temp/ as it starts)
    base.mkdir()
    for shared in ("models", "input"):
        (base / shared).symlink_to(comfy_base / shared, target_is_directory=True)
    monkeypatch.setenv("FACECHAIN_FUSION_PROCESSES", "2")
    server = ComfyServer(base).start()
    try:
        other = ComfyClient(server.url)
        first = other.run(fusion_prompt(targets, template, prefix="helpers1"))  # starts the helpers
        deadline = time.time() + 60
        while len(helper_pids(server.proc.pid)) < 2 and time.time() < deadline:
            time.sleep(0.5)
        pids = helper_pids(server.proc.pid)
        assert len(pids) == 2, "the host should have two helper processes after its first fusion"
        deadline = time.time() + 60  # the host's log says when both have warmed up
        while "2 helper processes ready" not in server.log_path.read_text(errors="replace") and time.time() < deadline:
            time.sleep(0.5)
        busy = cpu_ticks(pids)
        # the same photos from another folder: the host runs the fusion again instead of taking its cache
        again = input_folder_of(comfy_base, "helpers_targets_again", SAME[:2] + CROSS[:1])
        second = other.run(fusion_prompt(again, template, prefix="helpers2"))
        assert cpu_ticks(pids) > busy, "the helpers did none of the second fusion's work"
        for entry in (first, second):
            assert entry["outputs"]["3"]["text"] == threads_out["outputs"]["3"]["text"]
            got = png_arrays(other.output_images(entry, "4"))
            assert len(got) == len(expected) == 3
            assert all(np.array_equal(x, y) for x, y in zip(expected, got)), "helpers changed the fused pixels"
        log = server.log_path.read_text(errors="replace")
        assert "2 helper processes ready for FaceFusion" in log, server.log_tail()
        warnings = ("could not start", "failed to start", "process stopped", "no helper process left")
        assert not any(w in log for w in warnings) and "facechain_core/" not in log, server.log_tail()
    finally:
        server.stop()
    deadline = time.time() + 20
    while [pid for pid in pids if alive(pid)] and time.time() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if alive(pid)], "helper processes outlived their host"


def cpu_ticks(pids: list[int]) -> int:
    """User + system CPU ticks of these processes so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_reference_photos_without_a_face_are_an_error_only_when_there_is_a_face_to_fuse():
    """The references are looked at before the images now; a faceless set of them still only matters when
    some image has a face."""
    template = load_photo(FACES / "obama/obama1.jpg")
    card = np.full((120, 160, 3), 90, np.uint8)
    with pytest.raises(FaceChainError, match="no face in the reference photos"):
        fu.fuse_images(photos(SAME[:1]), template, fu.FusionSettings(processes=0), references=[card])
    result = fu.fuse_images([card, card[:, ::-1].copy()], template, fu.FusionSettings(processes=0),
                            references=[card])
    assert [f.fused for f in result.images] == [False, False]
    assert all("no face found" in f.note for f in result.images)


def test_the_helper_freed_last_takes_the_next_job():
    """Jobs go to the helpers in use (warm: a helper's first job is slow), not round the whole pool."""
    pool = processes.ProcessPool(2, preload=("fusion",))
    assert pool.wait(120) == 2
    try:
        card = np.full((6, 5, 3), 7, np.uint8)
        first, second = pool._free_helper(), pool._free_helper()
        pool._idle.put(first)
        pool._idle.put(second)  # freed last
        used = []
        done_with = pool._done_with
        pool._done_with = lambda helper: (used.append(helper), done_with(helper))
        for _ in range(3):
            pool.run("images:as_rgb_uint8", card, "card")
        assert used == [second] * 3  # first in, first out would have taken the first one
    finally:
        pool.close()


def test_a_job_in_parts_that_fails_midway_keeps_its_parts_and_says_so(helpers, caplog):
    """The second try's blend fails in the helper (a strength that is no number): the first part is there, the second
    raises the helper's error, the failure is logged even if nobody asks for it, and the helper stays."""
    args, _ = _blend_job(1)
    args = args[:-1] + ([args[-1][0], ("inner", "strong")],)
    with caplog.at_level("WARNING", logger="comfyui-facechain"):
        parts = helpers.run_parts("fusion:warped_blends", *args)
        assert parts.get(0)[0].dtype == np.uint8
        with pytest.raises(RuntimeError, match="in a helper process"):
            parts.get(1)
    assert "ended with" in caplog.text and "after 1 parts" in caplog.text
    assert helpers.ready == 2
