"""Small ONNX nets of the embedded models (SFace, YuNet) run by torch, on the host's GPU.

OpenCV runs these files on the CPU, one face at a time; in a graph that has just sampled on a GPU, the
recogniser alone was about half of FaceFusion's CPU time. Their graphs are plain: int8 weights with
per-block scales (``DequantizeLinear``, folded to float32 once, at load) and float32 convolutions, so the
same numbers come out of torch to float rounding. The file is read by a minimal protobuf reader here
(the ``onnx`` package is not a dependency); an operator outside the short list below is refused with a
clear error, never guessed.
"""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import FaceChainError

# ONNX TensorProto data types this reader knows: code -> numpy dtype
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 10: np.float16,
           11: np.float64}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; value: int for varints, bytes otherwise."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 2:
            size, i = _varint(buf, i)
            v, i = buf[i:i + size], i + size
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wt}")
        yield num, wt, v


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _ints(wt: int, v) -> list[int]:
    """A repeated int field's value, packed or not."""
    if wt == 0:
        return [_signed(v)]
    out, i = [], 0
    while i < len(v):
        x, i = _varint(v, i)
        out.append(_signed(x))
    return out


def _tensor(buf: bytes) -> tuple[str, np.ndarray]:
    dims, dtype, name, raw, floats, ints = [], 1, "", None, [], []
    for num, wt, v in _fields(buf):
        if num == 1:
            dims += _ints(wt, v)
        elif num == 2:
            dtype = v
        elif num == 4:
            floats += list(struct.unpack(f"<{len(v) // 4}f", v)) if wt == 2 else list(struct.unpack("<f", v))
        elif num in (5, 7):
            ints += _ints(wt, v)
        elif num == 8:
            name = v.decode()
        elif num == 9:
            raw = v
        elif num == 14 and v == 1:
            raise ValueError(f"tensor '{name}' keeps its data in an external file")
    if dtype not in _DTYPES:
        raise ValueError(f"tensor '{name}' has ONNX data type {dtype}")
    np_type = _DTYPES[dtype]
    if raw is not None:
        arr = np.frombuffer(raw, dtype=np.dtype(np_type).newbyteorder("<")).astype(np_type)
    elif dtype in (1, 11):
        arr = np.asarray(floats, np_type)
    else:
        arr = np.asarray(ints, np.int64).astype(np_type)
    return name, arr.reshape(dims) if dims else arr.reshape(())


def _attribute(buf: bytes):
    name, value, ints, floats = "", None, [], []
    for num, wt, v in _fields(buf):
        if num == 1:
            name = v.decode()
        elif num == 2:
            value = struct.unpack("<f", v)[0]
        elif num == 3:
            value = _signed(v)
        elif num == 4:
            value = bytes(v)
        elif num == 5:
            value = _tensor(v)[1]
        elif num == 7:
            floats += list(struct.unpack(f"<{len(v) // 4}f", v)) if wt == 2 else list(struct.unpack("<f", v))
        elif num == 8:
            ints += _ints(wt, v)
    if value is None:
        value = ints or floats
    return name, value


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)


@dataclass
class Graph:
    nodes: list[Node]
    constants: dict[str, np.ndarray]  # initializers
    inputs: list[str]  # graph inputs that are not initializers
    outputs: list[str]


def _node(buf: bytes) -> Node:
    node = Node("", [], [])
    for num, _, v in _fields(buf):
        if num == 1:
            node.inputs.append(v.decode())
        elif num == 2:
            node.outputs.append(v.decode())
        elif num == 4:
            node.op = v.decode()
        elif num == 5:
            k, val = _attribute(v)
            node.attrs[k] = val
        elif num == 7 and v:
            raise ValueError(f"operator domain '{v.decode()}' of {node.op}")
    return node


def _value_name(buf: bytes) -> str:
    return next((v.decode() for num, _, v in _fields(buf) if num == 1), "")


def read_graph(path: str | Path) -> Graph:
    """The nodes, initializers, inputs and outputs of an ONNX file."""
    path = Path(path)
    try:
        model = path.read_bytes()
        graph = next(v for num, wt, v in _fields(model) if num == 7 and wt == 2)
        nodes, consts, inputs, outputs = [], {}, [], []
        for num, _, v in _fields(graph):
            if num == 1:
                nodes.append(_node(v))
            elif num == 5:
                name, arr = _tensor(v)
                consts[name] = arr
            elif num == 11:
                inputs.append(_value_name(v))
            elif num == 12:
                outputs.append(_value_name(v))
    except (StopIteration, ValueError, IndexError, struct.error, UnicodeDecodeError) as e:
        raise FaceChainError(f"'{path.name}' is not an ONNX model this pack can read ({e}). "
                             f"Run `python install.py` again to fetch it.") from None
    return Graph(nodes, consts, [n for n in inputs if n not in consts], outputs)


def _dequantize(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, axis: int, block: int) -> np.ndarray:
    x = x.astype(np.float32)
    zero = np.zeros_like(scale) if zero is None else zero.astype(np.float32)
    if scale.ndim == 0:
        return (x - zero) * scale
    axis = axis % x.ndim
    if block:  # one scale per block of ``block`` values along ``axis``
        cut = tuple(slice(0, x.shape[axis]) if d == axis else slice(None) for d in range(x.ndim))
        return (x - np.repeat(zero, block, axis=axis)[cut]) * np.repeat(scale, block, axis=axis)[cut]
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - zero.reshape(shape)) * scale.reshape(shape)


def _reshape_to(shape_in, shape) -> list[int]:
    return [shape_in[i] if s == 0 else int(s) for i, s in enumerate(shape)]


class TorchNet:
    """An ONNX graph as a torch program: constants folded once, the rest run node by node."""

    OPS = ("Add", "BatchNormalization", "Constant", "Conv", "DequantizeLinear", "Dropout", "Flatten", "Gemm",
           "MaxPool", "Mul", "PRelu", "Relu", "Reshape", "Resize", "Sigmoid", "Sub", "Transpose",
           "TFConv", "TFPool", "TFPad", "TFAdd")  # the last four: TFLite's, read by tflite_graph

    def __init__(self, path: str | Path, device: str = "cpu"):
        """``path``: an ONNX file, or a TFLite one (``.tflite``)."""
        import torch

        if Path(path).suffix.lower() == ".tflite":
            from .tflite_graph import read_tflite

            g = read_tflite(path)
        else:
            g = read_graph(path)
        unknown = sorted({n.op for n in g.nodes} - set(self.OPS))
        if unknown:
            raise FaceChainError(f"'{Path(path).name}' uses operators this pack does not run on the GPU "
                                 f"({', '.join(unknown)}); it is run by OpenCV instead.")
        self.path = Path(path)
        self.device = torch.device(device)
        self.outputs = g.outputs
        consts = {k: torch.from_numpy(np.array(v)) for k, v in g.constants.items()}  # copies: writable
        consts[""] = None
        self._program = []
        with torch.no_grad():
            for node in g.nodes:
                if all(i in consts for i in node.inputs):  # weights: dequantized and reshaped once, here
                    for name, value in zip(node.outputs, self._run(node, [consts[i] for i in node.inputs])):
                        consts[name] = value
                else:
                    self._program.append(node)
        used = {i for n in self._program for i in n.inputs} | set(self.outputs)
        self.inputs = [name for name in g.inputs if name in used]  # weights declared as inputs are folded
        if len(self.inputs) != 1:
            raise FaceChainError(f"'{Path(path).name}' takes {len(self.inputs)} inputs; one image input is needed.")
        # shapes and scales are read by Python (Reshape, Resize): they stay on the CPU
        host = {i for n in self._program if n.op in ("Reshape", "Resize") for i in n.inputs[1:]}
        self._consts = {k: (v.to(self.device) if v is not None and k not in host else v)
                        for k, v in consts.items() if k in used}
        self._lock = threading.Lock()
        self._graphs: dict = {}
        self._graphs_ok = True
        self._seen: set = set()
        self._batch_checked: set = set()  # input shapes whose first batch was checked against a single run
        self._no_batch: set = set()  # input shapes whose outputs did not keep the batch: run one at a time
        self.pads = self.device.type == "cuda"  # run_many(..., same_batch=True) is honoured: see BATCHES

    @staticmethod
    def _run(node: Node, xs: list, batch: int = 1):
        """One node on its inputs; ``batch``: images stacked along the first axis, which a Reshape to a
        leading 1 (the files fix their batch of one there) keeps."""
        import torch
        import torch.nn.functional as F

        a, op = node.attrs, node.op
        if op == "Constant":
            return [torch.from_numpy(np.ascontiguousarray(a["value"]))]
        if op == "DequantizeLinear":
            zero = xs[2].numpy() if len(xs) > 2 and xs[2] is not None else None
            return [torch.from_numpy(_dequantize(xs[0].numpy(), xs[1].numpy(), zero, int(a.get("axis", 1)),
                                                 int(a.get("block_size", 0))))]
        if op == "Reshape":
            shape = _reshape_to(xs[0].shape, xs[1].tolist())
            if batch > 1 and shape and shape[0] == 1 and xs[0].shape[0] == batch:
                shape[0] = batch
            return [xs[0].reshape(shape)]
        if op == "Conv":
            pads = list(a.get("pads", [0, 0, 0, 0]))
            x = xs[0]
            if pads[:2] != pads[2:]:
                x, pads = F.pad(x, (pads[1], pads[3], pads[0], pads[2])), [0, 0]
            return [F.conv2d(x, xs[1], xs[2] if len(xs) > 2 else None, list(a.get("strides", [1, 1])),
                             pads[:2], list(a.get("dilations", [1, 1])), int(a.get("group", 1)))]
        if op == "BatchNormalization":
            return [F.batch_norm(xs[0], xs[3], xs[4], xs[1], xs[2], False, 0.0, float(a.get("epsilon", 1e-5)))]
        if op == "PRelu":
            return [torch.where(xs[0] >= 0, xs[0], xs[0] * xs[1])]
        if op in ("Add", "Sub", "Mul"):
            return [{"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}[op](xs[0], xs[1])]
        if op == "Relu":
            return [F.relu(xs[0])]
        if op == "Sigmoid":
            return [torch.sigmoid(xs[0])]
        if op == "Dropout":
            return [xs[0]]
        if op == "Flatten":
            return [xs[0].flatten(int(a.get("axis", 1)))]
        if op == "Gemm":
            w = xs[1].t() if a.get("transB", 0) else xs[1]
            x = xs[0].t() if a.get("transA", 0) else xs[0]
            y = float(a.get("alpha", 1.0)) * (x @ w)
            return [y + float(a.get("beta", 1.0)) * xs[2] if len(xs) > 2 and xs[2] is not None else y]
        if op == "Transpose":
            return [xs[0].permute(*a["perm"])]
        if op == "MaxPool":
            pads = list(a.get("pads", [0, 0, 0, 0]))
            return [F.max_pool2d(xs[0], list(a["kernel_shape"]), list(a.get("strides", a["kernel_shape"])),
                                 pads[:2], ceil_mode=bool(a.get("ceil_mode", 0)))]
        if op == "Resize":
            mode, how = a.get("mode", b"nearest"), a.get("coordinate_transformation_mode", b"half_pixel")
            if mode != b"nearest" or how != b"asymmetric" or a.get("nearest_mode", b"round_prefer_floor") != b"floor":
                raise FaceChainError(f"ONNX Resize ({mode.decode()}, {how.decode()}) is not supported here.")
            scales = xs[2].tolist() if len(xs) > 2 and xs[2] is not None and xs[2].numel() else None
            if scales:
                return [F.interpolate(xs[0], scale_factor=scales[2:], mode="nearest")]
            return [F.interpolate(xs[0], size=[int(s) for s in xs[3].tolist()[2:]], mode="nearest")]
        if op in ("TFConv", "TFPool"):
            x = xs[0]
            if op == "TFPool":
                if a.get("same"):  # pooling pads with -inf: a padded cell never wins
                    x = _same_padding(x, a["stride"], (1, 1), a["kernel"], float("-inf"))
                y = F.max_pool2d(x, list(a["kernel"]), list(a["stride"]))
            else:
                if a.get("same"):
                    x = _same_padding(x, a["stride"], a["dilation"], xs[1].shape[2:], 0.0)
                y = F.conv2d(x, xs[1], xs[2] if len(xs) > 2 and xs[2] is not None else None, list(a["stride"]),
                             0, list(a["dilation"]), x.shape[1] if a["depthwise"] else 1)
            return [_activation(y, a.get("act", 0))]
        if op == "TFAdd":
            return [_activation(xs[0] + xs[1], a.get("act", 0))]
        if op == "TFPad":
            (_, _), (top, bottom), (left, right), (front, back) = a["pads"]  # NHWC rows; the tensor is NCHW
            return [F.pad(xs[0], (left, right, top, bottom, front, back))]
        raise FaceChainError(f"ONNX operator {op} is not supported here.")

    # A CUDA graph per input shape keeps its own memory for good, so only a few, of small inputs: the crops of
    # the recognisers and the mesh, and portraits up to 640x640 (FaceFusion's and RTSRank's case), one image or
    # a batch of 8 of them (~185 MiB for the three nets' batches). Others run op by op.
    MAX_GRAPHS = 8
    MAX_GRAPH_PIXELS = 640 * 640
    # A batch is padded to the next of these sizes, longer runs cut in 8s: few shapes, so few graphs, and few first
    # runs of a shape (on an H200 a new input shape's first runs cost up to seconds: cuDNN picks and builds
    # its kernels); 8 run in ~0.6-0.9 ms, one in ~0.4
    BATCHES = (1, 8)
    # ``same_batch``: every input runs in a batch of 8, a lone one too. A batch's kernels round differently from
    # a single run's (TF32 convolutions, on a GPU), and FaceFusion checks a try alone or with others depending
    # on when its blend arrived, so an image at a guard's edge was fused in one run and not in the next. In
    # one batch size, an input's answer does not depend on what it ran with. Only where the company varies
    # from run to run: a new batch shape's first run costs ~2 s on an H200 (cuDNN), a single one ~40 ms.

    def _forward(self, x, batch: int = 1):
        vals = dict(self._consts)
        vals[self.inputs[0]] = x
        for node in self._program:
            for name, value in zip(node.outputs, self._run(node, [vals[i] for i in node.inputs], batch)):
                vals[name] = value
        return [vals[name] for name in self.outputs]

    @staticmethod
    def _as_input(x):
        """A uint8 HxWxC image (or a stack of them, BxHxWxC) becomes the net's float NCHW input on the device
        itself (the conversion a CPU would do on a ~3 MB array, here part of the graph); float NCHW input is
        taken as it is. On a GPU the float copy is laid out NCHW: the permuted view keeps the image's
        channels-last strides, and a channels-last input sends every convolution of the net to cuDNN,
        depthwise ones too, which on an H200 took 1.5-2.7 s to plan each new input shape's first run (YuNet);
        in NCHW PyTorch's own depthwise kernel runs them, with nothing to plan. (A CPU runs the net about twice
        as fast channels-last.)"""
        import torch

        if x.dtype != _uint8():
            return x
        nchw = x.permute(2, 0, 1)[None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return nchw.to(torch.float32, memory_format=torch.contiguous_format if x.is_cuda else torch.preserve_format)

    def _capture(self, shape: tuple, dtype, batch: int):
        """A CUDA graph of the whole net for one input shape: a replay launches every kernel at once (run
        op by op, the net spends its time in Python: 3.4 ms for SFace on an H200, most of it launches)."""
        import torch

        static_in = torch.zeros(shape, dtype=dtype, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up off the capture: cuDNN picks its kernels here
                shapes = [tuple(o.shape) for o in self._forward(self._as_input(static_in), batch)]
        torch.cuda.current_stream(self.device).wait_stream(side)
        # every output in one buffer: one copy back to the host instead of one per output (YuNet has 12). It is
        # made before the capture, so nothing made inside the capture outlives it. Under PyTorch's cudaMallocAsync
        # allocator (ComfyUI's default on recent GPUs) such memory, freed after the capture, aborted the process
        # (an H200, torch 2.11); kept, it slowed every later first use: the host's first prompt took 9 s longer
        # (the trainer's first capture 8.3 s instead of 2.2).
        flat = torch.empty(sum(int(np.prod(sh)) for sh in shapes), dtype=torch.float32, device=self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outs = self._forward(self._as_input(static_in), batch)
            torch.cat([o.float().reshape(-1) for o in outs], out=flat)
            del outs
        static_out = (flat, shapes)
        self._graphs[(shape, dtype, batch)] = (graph, static_in, static_out)
        return self._graphs[(shape, dtype, batch)]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for the one input ``x`` (float32 NCHW, or a uint8 HxWxC image taken as
        ``blobFromImage`` without scaling would take it), as float32 numpy arrays. On a GPU, an input shape
        seen before runs as one CUDA graph."""
        return self._outputs(self._tensor(x), 1)

    def run_many(self, xs: list[np.ndarray], same_batch: bool = False) -> list[list[np.ndarray]]:
        """``[self(x) for x in xs]``, inputs of one shape and type run as batches: one copy in, one run, one
        copy out for up to 8 of them (padded to 8: ``BATCHES``; ``same_batch``: every one in a batch of 8, a lone
        input too, where ``pads``, on a GPU; ``x`` as for ``__call__``; float NCHW inputs have a batch of one
        each). The first batch of each input shape is checked against single runs of its first and last input;
        a net whose outputs do not keep the batch (or that cannot take one) runs one at a time."""
        groups: dict = {}
        for i, x in enumerate(xs):
            groups.setdefault((tuple(np.shape(x)), np.asarray(x).dtype == np.uint8), []).append(i)
        out: list = [None] * len(xs)
        for (shape, _), idx in groups.items():
            for start in range(0, len(idx), self.BATCHES[-1]):
                part = idx[start:start + self.BATCHES[-1]]
                for i, o in zip(part, self._batched([xs[i] for i in part], shape, same_batch and self.pads)):
                    out[i] = o
        return out

    def _batched(self, xs: list, shape: tuple, same_batch: bool = False) -> list[list[np.ndarray]]:
        one_each = len(shape) == 4  # float NCHW inputs of batch one
        if (len(xs) == 1 and not same_batch) or (one_each and shape[0] != 1) or shape in self._no_batch:
            return [self(x) for x in xs]
        # one size for every group when the answers must not depend on the company (see BATCHES)
        size = self.BATCHES[-1] if same_batch else next(b for b in self.BATCHES if b >= len(xs))
        padded = list(xs) + [xs[-1]] * (size - len(xs))
        stack = np.concatenate(padded) if one_each else np.stack(padded)
        checked = shape in self._batch_checked
        try:  # the first batch of a shape runs op by op (captured from its second on, once it passed)
            values = self._outputs(self._tensor(stack), size, capture=checked)
        except RuntimeError:  # a graph that cannot take a batch at all
            if checked:
                raise
            values = None
        items = [[v[i:i + 1] for v in values] for i in range(len(xs))] if values is not None else None
        if not checked:
            ends = [0, len(xs) - 1] if len(xs) > 1 else [0]
            singles = {i: self(xs[i]) for i in ends}
            # loose: a GPU's batched kernels round differently (TF32 convolutions), a graph that mixes its
            # batch is off by the size of the values
            kept = values is not None and all(v.shape[0] == size for v in values) and all(
                a.shape == b.shape and _off(a, b) <= 0.01 * (1.0 + _off(b, 0.0))
                for i in ends for a, b in zip(items[i], singles[i]))
            self._batch_checked.add(shape)
            if not kept:
                self._no_batch.add(shape)
                return [singles[i] if i in singles else self(x) for i, x in enumerate(xs)]
        return items

    @staticmethod
    def _tensor(x: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(x) if x.dtype == np.uint8 else np.ascontiguousarray(x, np.float32))

    def _outputs(self, x, batch: int, capture: bool = False) -> list[np.ndarray]:
        """The net's outputs for ``x`` (``batch`` images along its first axis); on a GPU from a CUDA graph of
        that input once the input was seen before (or at once when ``capture``)."""
        import torch

        key = (tuple(x.shape), x.dtype, batch)
        with self._lock, torch.inference_mode():
            if self.device.type != "cuda":
                return [v.float().numpy() for v in self._forward(self._as_input(x), batch)]
            held = self._graphs.get(key)
            small = int(np.prod(key[0])) <= 3 * self.MAX_GRAPH_PIXELS * batch and len(self._graphs) < self.MAX_GRAPHS
            if held is None and (key in self._seen or capture) and self._graphs_ok and small:
                try:
                    held = self._capture(*key)
                except RuntimeError:  # a host whose allocator or hooks refuse capture: run op by op from now on
                    self._graphs_ok = False
                    torch.cuda.synchronize(self.device)
            if len(self._seen) > 64:  # many one-off shapes: forget them, keep the graphs
                self._seen.clear()
            self._seen.add(key)
            if held is None:
                return [v.float().cpu().numpy() for v in self._forward(self._as_input(x.to(self.device)), batch)]
            graph, static_in, (flat, shapes) = held
            static_in.copy_(x)
            graph.replay()
            values = flat.cpu().numpy()
        sizes = np.cumsum([int(np.prod(sh)) for sh in shapes])[:-1]
        return [v.reshape(sh) for v, sh in zip(np.split(values, sizes), shapes)]


def _off(a, b) -> float:
    """The largest absolute difference."""
    return float(np.abs(np.asarray(a) - b).max(initial=0.0))


def _uint8():
    import torch

    return torch.uint8


def _same_padding(x, stride, dilation, kernel, fill: float):
    """TFLite's SAME padding of NCHW ``x`` for a kernel: the output is ceil(size / stride), the odd row or
    column of padding going after (bottom, right)."""
    import torch.nn.functional as F

    pads = []
    for size, s, d, k in zip(x.shape[2:], stride, dilation, kernel):
        total = max((-(-int(size) // s) - 1) * s + (int(k) - 1) * d + 1 - int(size), 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return F.pad(x, (left, right, top, bottom), value=fill) if top or bottom or left or right else x


def _activation(y, act: int):
    """TFLite's fused activations: 0 none, 1 ReLU, 2 ReLU -1..1, 3 ReLU6."""
    import torch

    if act == 0:
        return y
    if act == 1:
        return torch.relu(y)
    if act == 2:
        return y.clamp(-1.0, 1.0)
    if act == 3:
        return y.clamp(0.0, 6.0)
    raise FaceChainError(f"TFLite fused activation {act} is not supported here.")


_host = {"device": "any"}  # the device the host runs its models on ("cpu" when told so): see follow_host


def follow_host(device_type: str) -> None:
    """The host's own device choice (ComfyUI's ``--cpu`` gives "cpu"): with the setting at auto, the nets
    then stay on the CPU too, as the user asked of the host. Nodes call it; the library never asks ComfyUI."""
    _host["device"] = "cpu" if device_type == "cpu" else "any"


def nets_device() -> str | None:
    """Where the embedded nets run: a CUDA device when the setting (``data/embedded_nets.json``, or the
    FACECHAIN_NETS_DEVICE environment variable: auto, cuda, cpu), the host and the machine allow it, else
    None (OpenCV on the CPU)."""
    import os

    return _nets_device(os.environ.get("FACECHAIN_NETS_DEVICE", ""), _host["device"])


@lru_cache(maxsize=8)
def _nets_device(env: str, host: str) -> str | None:
    from .data_files import load

    choice = env.strip().lower() or load("embedded_nets.json")["device"]
    if choice not in ("auto", "cuda", "cpu"):
        raise FaceChainError(f"FACECHAIN_NETS_DEVICE is '{choice}'; use auto, cuda or cpu.")
    if choice == "cpu" or (choice == "auto" and host == "cpu"):
        return None
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        if choice == "cuda":
            raise FaceChainError("FACECHAIN_NETS_DEVICE is 'cuda' but torch sees no CUDA GPU; set it to auto or cpu.")
        return None
    return "cuda"


# The file of a held net (and the licence setting) is looked up again at most this often: the lookup (package
# specs, file stats) cost a quarter of a millisecond a call, all of it holding the GIL that a pool of threads
# fusing side by side shares, and every face detected, embedded or meshed asks for its net.
RECHECK_S = 2.0
_recent: dict = {}  # (name, device) -> (time.monotonic() of the lookup, net or None)


def gpu_net(name: str) -> TorchNet | None:
    """The embedded model ``name`` (``sface``, ``yunet``) as a TorchNet on the GPU, held once per process
    (its runs are queued on one lock; a run is a millisecond or two); None when the nets stay on the CPU."""
    device = nets_device()
    if device is None:
        return None
    key, now = (name, device), time.monotonic()
    hit = _recent.get(key)
    if hit is not None and now - hit[0] < RECHECK_S:
        return hit[1]
    from . import model_store
    from .model_cache import cached

    path = model_store.embedded_path(name)

    def load():
        try:
            return TorchNet(path, device)
        except FaceChainError:
            return False  # a file with operators this reader does not run: OpenCV runs it

    net = cached(("torch_net", name, device), load, [path]) or None
    _recent[key] = (now, net)
    return net
