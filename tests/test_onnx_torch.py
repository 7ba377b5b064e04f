"""The embedded nets (YuNet, SFace, the face mesh) run by torch from their files: OpenCV's numbers.

On a GPU host FaceFusion and RTSRank run them this way (``data/embedded_nets.json``); CI has no GPU, so
here torch runs the very same program on the CPU, on real photos, against OpenCV running the files as the
CPU path does. Also: the protobuf reader against the ``onnx`` package, the clear errors, and the geometry
helpers fusion uses in place of per-point and per-triangle OpenCV calls.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import FACES
from facechain_core import fusion, model_store
from facechain_core import fusion_geometry as fg
from facechain_core.detect import YuNetDetector
from facechain_core.errors import FaceChainError
from facechain_core.images import load_photo
from facechain_core.onnx_torch import TorchNet, nets_device, read_graph
from facechain_core.recognition import SFaceRecogniser, face_row, sface_blob
from facechain_core.threads import DETECT_MAX_SIDE, detect_faces_per_thread

PHOTOS = sorted(FACES.glob("*/*.jpg"))


def _working_size(rgb: np.ndarray) -> np.ndarray:
    k = DETECT_MAX_SIDE / max(rgb.shape[:2])
    return cv2.resize(rgb, None, fx=k, fy=k, interpolation=cv2.INTER_AREA) if k < 1 else rgb


@pytest.fixture(scope="module")
def nets():
    return TorchNet(model_store.embedded_path("yunet")), TorchNet(model_store.embedded_path("sface"))


@pytest.fixture(scope="module")
def mesh_torch():
    return TorchNet(model_store.embedded_path("face_mesh"))  # the TFLite file, read by tflite_graph


@pytest.mark.parametrize("name", ["yunet", "sface"])
def test_the_reader_gives_every_initializer_as_the_onnx_package_does(name):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    path = model_store.embedded_path(name)
    model = onnx.load(str(path))
    ours = read_graph(path)
    theirs = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert set(ours.constants) == set(theirs)
    for key, value in theirs.items():
        assert ours.constants[key].dtype == value.dtype and np.array_equal(ours.constants[key], value), key
    assert [n.op_type for n in model.graph.node] == [n.op for n in ours.nodes]
    assert ours.outputs == [o.name for o in model.graph.output]


def test_yunet_through_torch_finds_what_opencv_finds_on_every_shared_photo(nets):
    yunet, _ = nets
    detector = YuNetDetector()
    compared = faces = 0
    for path in PHOTOS:
        bgr = cv2.cvtColor(_working_size(load_photo(path)), cv2.COLOR_RGB2BGR)
        detector._net.setInputSize((bgr.shape[1], bgr.shape[0]))
        _, want = detector._net.detect(bgr)
        want = np.zeros((0, 15), np.float32) if want is None else want
        got = detector._detect_on(yunet, bgr)
        assert got.shape == want.shape, path.name
        if len(want):
            np.testing.assert_allclose(got, want, atol=0.01, err_msg=path.name)  # boxes, keypoints in px; score
        compared += 1
        faces += len(want)
    assert compared == len(PHOTOS) >= 20 and faces >= compared  # every photo, the group shots' many faces too


def test_sface_through_torch_embeds_as_opencv_does(nets):
    _, sface = nets
    recogniser = SFaceRecogniser()
    cosines = []
    for path in PHOTOS[::2]:
        rgb = load_photo(path)
        faces = detect_faces_per_thread(rgb)
        if not faces:
            continue
        crop = recogniser._sf.alignCrop(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), face_row(faces[0]))
        want = recogniser._forward(crop).ravel()
        got = sface(sface_blob(crop))[0].ravel()
        cosines.append(float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)))
    assert len(cosines) >= 8 and min(cosines) > 0.99999


def test_the_face_mesh_through_torch_finds_the_points_opencv_finds(mesh_torch):
    from facechain_core import face_mesh as fm

    compared = 0
    for path in PHOTOS[::3]:
        rgb = load_photo(path)
        faces = detect_faces_per_thread(rgb)
        if not faces:
            continue
        want = fm.face_mesh(rgb, faces[0].keypoints)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fm, "gpu_net", {"face_mesh": mesh_torch}.get)
            got = fm.face_mesh(rgb, faces[0].keypoints)
        scale = float(np.ptp(want.points[:, 0]))
        assert np.abs(got.points - want.points).max() < 1e-3 * scale, path.name  # both passes, image pixels
        assert abs(got.presence - want.presence) < 1e-4
        compared += 1
    assert compared >= 5


def test_fusion_with_the_nets_in_torch_decides_as_with_opencv(nets, mesh_torch, monkeypatch):
    """The whole fusion of one photo of a person into another, once with OpenCV's nets and once with the
    torch programs in their place (CPU here, the GPU on a GPU host): the same decision and likeness, and
    the face is found again on the whole image, as the GPU path searches it."""
    yunet, sface = nets
    images = [load_photo(FACES / "obama" / n) for n in ("obama2.jpg", "obama3.jpg")]
    template = load_photo(FACES / "obama" / "obama1.jpg")
    settings = fusion.FusionSettings(workers=1)
    with_cv2 = fusion.fuse_images(images, template, settings)
    monkeypatch.setattr("facechain_core.detect.gpu_net", {"yunet": yunet}.get)
    monkeypatch.setattr("facechain_core.recognition.gpu_net", {"sface": sface}.get)
    monkeypatch.setattr("facechain_core.face_mesh.gpu_net", {"face_mesh": mesh_torch}.get)
    with_torch = fusion.fuse_images(images, template, settings)
    for a, b in zip(with_cv2.images, with_torch.images):
        assert a.level == b.level, (a.note, b.note)
        assert a.embedding is not None and b.embedding is not None
        assert float(a.embedding @ b.embedding) > 0.98, (a.note, b.note)


def test_a_file_with_an_operator_it_does_not_run_is_refused_by_name(tmp_path):
    bad = tmp_path / "not.tflite"
    bad.write_bytes(b"\x08\x00\x00\x00garbage")
    with pytest.raises(FaceChainError, match="not a TFLite model"):
        TorchNet(bad)

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "softmax.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(FaceChainError, match="Softmax"):
        TorchNet(path)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x3a\xff\xff\xff\xff\x0f not a model")
    with pytest.raises(FaceChainError, match="not an ONNX model"):
        read_graph(broken)


def test_the_device_setting(monkeypatch):
    monkeypatch.setenv("FACECHAIN_NETS_DEVICE", "cpu")
    assert nets_device() is None
    monkeypatch.setenv("FACECHAIN_NETS_DEVICE", "tpu")
    with pytest.raises(FaceChainError, match="auto, cuda or cpu"):
        nets_device()
    import torch

    if not torch.cuda.is_available():
        monkeypatch.setenv("FACECHAIN_NETS_DEVICE", "cuda")
        with pytest.raises(FaceChainError, match="no CUDA GPU"):
            nets_device()
        monkeypatch.setenv("FACECHAIN_NETS_DEVICE", "auto")
        assert nets_device() is None


def test_a_host_told_to_use_the_cpu_keeps_the_nets_there(monkeypatch):
    """ComfyUI started with --cpu on a machine with a GPU: auto leaves the nets on the CPU, an explicit cuda
    still takes the GPU. (No GPU here: torch's answer is the one thing made up.)"""
    import torch

    from facechain_core import onnx_torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    onnx_torch._nets_device.cache_clear()
    try:
        monkeypatch.setenv("FACECHAIN_NETS_DEVICE", "auto")
        onnx_torch.follow_host("cuda")
        assert nets_device() == "cuda"
        onnx_torch.follow_host("cpu")
        assert nets_device() is None
        monkeypatch.setenv("FACECHAIN_NETS_DEVICE", "cuda")
        assert nets_device() == "cuda"
    finally:
        onnx_torch.follow_host("any")
        onnx_torch._nets_device.cache_clear()


def _meshes():
    for name in ("obama/obama1.jpg", "biden/biden2.jpg", "rose_leslie/rose1.jpg"):
        rgb = load_photo(FACES / name)
        yield fusion.target_shape(rgb, detect_faces_per_thread(rgb)[0])


def test_triangle_labels_give_each_pixel_the_triangle_that_holds_it():
    for shape in _meshes():
        pts = shape.points.astype(np.float64) - shape.points.min(axis=0) + 3
        tris = fg.triangulate(shape.points)
        h, w = (np.ceil(pts.max(axis=0)) + 4).astype(int)[::-1]
        label = fg.triangle_labels(pts, tris, (h, w))
        # brute force: each pixel centre against every triangle (edges count as inside)
        yy, xx = np.mgrid[0:h, 0:w]
        a, b, c = (pts[tris[:, i]] for i in range(3))
        area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])

        def edge(p, q, sign, x, y):  # >= 0 on the inner side of edge p->q (or on it)
            return sign * ((q[:, 0] - p[:, 0]) * (y - p[:, 1]) - (q[:, 1] - p[:, 1]) * (x - p[:, 0]))

        held = label >= 0
        ys, xs = np.nonzero(held)
        k = label[ys, xs]
        for p, q in ((a, b), (b, c), (c, a)):
            assert np.all(edge(p[k], q[k], np.sign(area[k]), xs, ys) >= -1e-6)
        # and no pixel inside some (non-flat) triangle is left out
        inside_any = np.zeros((h, w), bool)
        for t in np.flatnonzero(area != 0):
            e = [edge(p[t:t + 1], q[t:t + 1], np.sign(area[t]), xx, yy) for p, q in ((a, b), (b, c), (c, a))]
            inside_any |= (e[0] >= -1e-6) & (e[1] >= -1e-6) & (e[2] >= -1e-6)
        assert np.array_equal(held, inside_any)


def test_inside_polygon_agrees_with_opencv():
    rng = np.random.default_rng(7)
    for shape in _meshes():
        poly = shape.inner_polygon(0.8).astype(np.float32)
        points = np.vstack([shape.points, rng.uniform(shape.points.min(0), shape.points.max(0), (2000, 2)),
                            poly[:5]]).astype(np.float32)  # the polygon's own corners lie on its edge
        want = np.array([cv2.pointPolygonTest(poly, (float(x), float(y)), False) >= 0 for x, y in points])
        assert np.array_equal(fg.inside_polygon(points, poly), want)


def test_batches_give_what_single_runs_give(nets, mesh_torch):
    """``run_many``: up to 8 inputs of one shape stacked into one run (padded to 8), more cut in
    eights, mixed shapes grouped; each input's outputs as its own run gives them. YuNet's file fixes a batch of
    one in its Reshapes: the batch is kept there."""
    yunet, sface = nets
    rng = np.random.default_rng(3)
    photos = [cv2.resize(load_photo(p), (320, 320)) for p in PHOTOS[:5]]
    cases = [(yunet, photos + [cv2.resize(photos[0], (256, 192))]),
             (sface, [rng.random((1, 3, 112, 112), dtype=np.float32) for _ in range(11)]),
             (mesh_torch, [rng.random((1, 3, 192, 192), dtype=np.float32) for _ in range(3)])]
    for net, xs in cases:
        many = net.run_many(xs)
        assert len(many) == len(xs)
        for x, got in zip(xs, many):
            want = net(x)
            assert [a.shape for a in got] == [b.shape for b in want]
            for a, b in zip(got, want):
                np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * (1 + float(np.abs(b).max())))
        assert not net._no_batch and net._batch_checked, net.path.name  # batches run and kept, not one by one


class _Mixing(TorchNet):
    """Every output summed over the batch: the batch is lost."""

    def _forward(self, x, batch=1):
        return [o.sum(0, keepdim=True) for o in super()._forward(x, batch)]


class _Single(TorchNet):
    """A graph that refuses any batch (as a fixed-shape file would)."""

    def _forward(self, x, batch=1):
        if x.shape[0] > 1:
            raise RuntimeError("shape mismatch")
        return super()._forward(x, batch)


@pytest.mark.parametrize("kind", [_Mixing, _Single], ids=["loses_the_batch", "refuses_a_batch"])
def test_a_net_that_loses_or_refuses_the_batch_runs_one_at_a_time(nets, kind):
    """A graph that mixes its batch fails the first batch's check against single runs; one that cannot take a
    batch raises in it. Either way that shape then runs one input at a time, with the right answers."""
    net = kind(nets[1].path)  # SFace
    rng = np.random.default_rng(4)
    xs = [rng.random((1, 3, 112, 112), dtype=np.float32) for _ in range(3)]
    got = net.run_many(xs)
    assert net._no_batch == {(1, 3, 112, 112)}
    for x, outs in zip(xs, got):
        np.testing.assert_allclose(outs[0], net(x)[0], rtol=1e-5)


def test_the_many_forms_find_embed_and_mesh_as_the_single_ones(nets, mesh_torch, monkeypatch):
    """detect_faces_many, embed_faces and face_meshes with the torch nets (batched) give the single calls'
    answers on real photos of several sizes, a photo without a face among them."""
    from facechain_core import face_mesh as fm
    from facechain_core.recognition import embed_face, embed_faces
    from facechain_core.threads import detect_faces_many

    yunet, sface = nets
    monkeypatch.setattr("facechain_core.detect.gpu_net", {"yunet": yunet}.get)
    monkeypatch.setattr("facechain_core.onnx_torch.gpu_net", {"yunet": yunet, "sface": sface,
                                                              "face_mesh": mesh_torch}.get)
    monkeypatch.setattr("facechain_core.recognition.gpu_net", {"sface": sface}.get)
    monkeypatch.setattr(fm, "gpu_net", {"face_mesh": mesh_torch}.get)
    rgbs = [load_photo(p) for p in PHOTOS[:6]] + [np.full((200, 300, 3), 90, np.uint8)]
    found = detect_faces_many(rgbs)
    assert found[-1] == [] and sum(bool(f) for f in found) >= 5
    for rgb, faces in zip(rgbs, found):
        want = detect_faces_per_thread(rgb)
        assert len(faces) == len(want)
        for a, b in zip(faces, want):
            np.testing.assert_allclose(a.keypoints, b.keypoints, atol=0.05)
    pairs = [(rgb, faces[0]) for rgb, faces in zip(rgbs, found) if faces]
    for got, (rgb, face) in zip(embed_faces(pairs), pairs):
        assert float(got @ embed_face(rgb, face)) > 0.99999
    for got, (rgb, face) in zip(fm.face_meshes([(rgb, f.keypoints) for rgb, f in pairs]), pairs):
        want = fm.face_mesh(rgb, face.keypoints)
        assert np.abs(got.points - want.points).max() < 1e-3 * float(np.ptp(want.points[:, 0]))
        assert abs(got.presence - want.presence) < 1e-4


def test_same_batch_runs_a_lone_input_padded_so_its_answer_does_not_depend_on_its_company(nets, mesh_torch,
                                                                                          monkeypatch):
    """``same_batch`` (honoured where ``pads``: on a GPU; set here on the CPU nets), as FaceFusion's after-checks
    ask it: every input runs in a batch of 8, a lone one too, so an input's answer is the same bytes whether it
    ran alone or with others (a check runs alone or with the tries that arrived with it). Without it a lone
    input still runs alone."""
    from facechain_core import face_mesh as fm
    from facechain_core.recognition import embed_faces
    from facechain_core.threads import detect_faces_many

    yunet, sface = nets
    assert not yunet.pads  # the CPU's default: same_batch is not honoured there
    monkeypatch.setattr("facechain_core.detect.gpu_net", {"yunet": yunet}.get)
    monkeypatch.setattr("facechain_core.onnx_torch.gpu_net", {"yunet": yunet, "sface": sface,
                                                              "face_mesh": mesh_torch}.get)
    monkeypatch.setattr("facechain_core.recognition.gpu_net", {"sface": sface}.get)
    monkeypatch.setattr(fm, "gpu_net", {"face_mesh": mesh_torch}.get)
    rgbs = [cv2.resize(load_photo(p), (320, 320)) for p in PHOTOS[:3]]
    pairs = [(rgb, faces[0]) for rgb, faces in zip(rgbs, detect_faces_many(rgbs))]
    kps = [(rgb, f.keypoints) for rgb, f in pairs]
    batches = []
    for net in (yunet, sface, mesh_torch):
        monkeypatch.setattr(net, "pads", True)
        monkeypatch.setattr(net, "_outputs", lambda x, batch, capture=False, _o=net._outputs: (
            batches.append(batch), _o(x, batch, capture))[1])
    # each shape's first batch is also checked against single runs: run them all once before counting
    detect_faces_many(rgbs, same_batch=True), embed_faces(pairs, same_batch=True)
    fm.face_meshes(kps, same_batch=True)
    batches.clear()

    alone = detect_faces_many(rgbs[:1], same_batch=True)
    together = detect_faces_many(rgbs[2:] + rgbs[:1], same_batch=True)
    assert np.array_equal(alone[0][0].keypoints, together[1][0].keypoints)
    assert np.array_equal(embed_faces(pairs[:1], same_batch=True)[0],
                          embed_faces(pairs[1:] + pairs[:1], same_batch=True)[-1])
    one, many = fm.face_meshes(kps[:1], same_batch=True)[0], fm.face_meshes(kps[::-1], same_batch=True)[-1]
    assert np.array_equal(one.points, many.points) and one.presence == many.presence
    assert batches and set(batches) == {8}, batches  # every run a batch of 8, the lone ones too
    batches.clear()
    detect_faces_many(rgbs[:1]), embed_faces(pairs[:1]), fm.face_meshes(kps[:1])
    assert batches and set(batches) == {1}, batches  # not asked: a lone input runs alone
