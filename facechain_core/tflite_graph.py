"""A TFLite file (MediaPipe's face mesh) read into the graph that ``onnx_torch.TorchNet`` runs.

A minimal FlatBuffers reader for the parts of TFLite's schema these nets use: tensors, buffers and the
operators CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE, ADD, PRELU, MAX_POOL_2D and PAD. Weights come out in
torch's NCHW layout (float16 ones made float32, as the DEQUANTIZE operators do); SAME padding is worked out
at run time from the input's size, as TFLite does. Any other operator is refused by name.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .errors import FaceChainError
from .onnx_torch import Graph, Node

# TFLite builtin operator codes and tensor types used here
ADD, CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE, MAX_POOL_2D, PAD, PRELU = 0, 3, 4, 6, 17, 34, 54
_NAMES = {ADD: "ADD", CONV_2D: "CONV_2D", DEPTHWISE_CONV_2D: "DEPTHWISE_CONV_2D", DEQUANTIZE: "DEQUANTIZE",
          MAX_POOL_2D: "MAX_POOL_2D", PAD: "PAD", PRELU: "PRELU"}
_TYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 9: np.int8}


class _Table:
    """One FlatBuffers table: fields by their index in the schema."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vsize = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, i: int) -> int:
        at = 4 + 2 * i
        return struct.unpack_from("<H", self.buf, self.vtable + at)[0] if at < self.vsize else 0

    def scalar(self, i: int, fmt: str, default=0):
        off = self._field(i)
        return struct.unpack_from("<" + fmt, self.buf, self.pos + off)[0] if off else default

    def _vector(self, i: int) -> tuple[int, int]:
        off = self._field(i)
        if not off:
            return 0, 0
        at = self.pos + off
        at += struct.unpack_from("<I", self.buf, at)[0]
        return at + 4, struct.unpack_from("<I", self.buf, at)[0]

    def table(self, i: int) -> "_Table | None":
        off = self._field(i)
        if not off:
            return None
        at = self.pos + off
        return _Table(self.buf, at + struct.unpack_from("<I", self.buf, at)[0])

    def tables(self, i: int) -> list["_Table"]:
        start, n = self._vector(i)
        at = [start + 4 * k for k in range(n)]
        return [_Table(self.buf, a + struct.unpack_from("<I", self.buf, a)[0]) for a in at]

    def array(self, i: int, dtype) -> np.ndarray:
        start, n = self._vector(i)
        return np.frombuffer(self.buf, dtype, n, start) if n else np.zeros(0, dtype)

    def string(self, i: int) -> str:
        start, n = self._vector(i)
        return self.buf[start:start + n].decode() if n else ""


def _options(op: _Table, code: int) -> dict:
    o = op.table(4)  # builtin_options
    if o is None:
        return {}
    if code == CONV_2D:
        return dict(same=o.scalar(0, "b") == 0, stride=(o.scalar(2, "i", 1), o.scalar(1, "i", 1)),
                    act=o.scalar(3, "b"), dilation=(o.scalar(5, "i", 1), o.scalar(4, "i", 1)), depthwise=False)
    if code == DEPTHWISE_CONV_2D:
        return dict(same=o.scalar(0, "b") == 0, stride=(o.scalar(2, "i", 1), o.scalar(1, "i", 1)),
                    act=o.scalar(4, "b"), dilation=(o.scalar(6, "i", 1), o.scalar(5, "i", 1)), depthwise=True)
    if code == MAX_POOL_2D:
        return dict(same=o.scalar(0, "b") == 0, stride=(o.scalar(2, "i", 1), o.scalar(1, "i", 1)),
                    kernel=(o.scalar(4, "i", 1), o.scalar(3, "i", 1)), act=o.scalar(5, "b"))
    if code == ADD:
        return dict(act=o.scalar(0, "b"))
    return {}


def read_tflite(path: str | Path) -> Graph:
    """The first subgraph of a TFLite file as a Graph of NCHW operators (TFConv, TFPool, TFPad, TFAdd,
    PRelu), its weights folded into constants."""
    path = Path(path)
    try:
        buf = path.read_bytes()
        model = _Table(buf, struct.unpack_from("<I", buf, 0)[0])
        codes = [max(c.scalar(0, "b"), c.scalar(3, "i")) for c in model.tables(1)]
        buffers = model.tables(4)
        graph = model.tables(2)[0]
        tensors = graph.tables(0)
        names = [t.string(3) or f"t{k}" for k, t in enumerate(tensors)]
        consts: dict[str, np.ndarray] = {}
        for k, t in enumerate(tensors):
            data = buffers[t.scalar(2, "I")].array(0, np.uint8) if t.scalar(2, "I") < len(buffers) else []
            if len(data):
                kind = _TYPES.get(t.scalar(1, "b"))
                if kind is None:
                    raise ValueError(f"tensor {names[k]} has TFLite type {t.scalar(1, 'b')}")
                consts[names[k]] = np.frombuffer(data.tobytes(), kind).reshape(t.array(0, np.int32))
        nodes = []
        for op in graph.tables(3):
            code = codes[op.scalar(0, "I")]
            ins = [names[i] if i >= 0 else "" for i in op.array(1, np.int32)]
            outs = [names[i] for i in op.array(2, np.int32)]
            if code not in _NAMES:
                raise FaceChainError(f"'{path.name}' uses TFLite operator {code}, which this pack does not run "
                                     f"on the GPU; it is run by OpenCV instead.")
            nodes.append((code, ins, outs, _options(op, code)))
        inputs = [names[i] for i in graph.array(1, np.int32)]
        outputs = [names[i] for i in graph.array(2, np.int32)]
    except (IndexError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise FaceChainError(f"'{path.name}' is not a TFLite model this pack can read ({e}). "
                             f"Run `python install.py` again to fetch it.") from None
    return Graph(_to_nchw(nodes, consts), consts, inputs, outputs)


def _to_nchw(nodes: list, consts: dict) -> list[Node]:
    """TFLite's NHWC operators as NCHW ones; their constant inputs rearranged to match."""
    out = []
    for code, ins, outs, opts in nodes:
        if code == DEQUANTIZE:  # float16 weights: float32 once, now
            consts[outs[0]] = consts[ins[0]].astype(np.float32)
            continue
        if code in (CONV_2D, DEPTHWISE_CONV_2D):
            w = consts[ins[1]].astype(np.float32)
            # CONV_2D: OHWI -> OIHW; DEPTHWISE_CONV_2D: 1HWC -> C1HW
            order = (0, 3, 1, 2) if code == CONV_2D else (3, 0, 1, 2)
            consts[ins[1]] = np.ascontiguousarray(w.transpose(order))
            out.append(Node("TFConv", ins, outs, opts))
        elif code == PRELU:
            alpha = consts[ins[1]].astype(np.float32)
            channels = alpha.shape[-1]
            per_pixel = alpha.size != channels  # one slope per channel, or per (row, column, channel)
            consts[ins[1]] = np.ascontiguousarray(alpha.reshape(alpha.shape[-3:]).transpose(2, 0, 1) if per_pixel
                                                  else alpha.reshape(channels, 1, 1))
            out.append(Node("PRelu", ins, outs))
        elif code == PAD:
            pads = consts[ins[1]].astype(np.int64)  # NHWC rows of (before, after)
            out.append(Node("TFPad", ins[:1], outs, dict(pads=pads.tolist())))
        elif code == MAX_POOL_2D:
            out.append(Node("TFPool", ins, outs, opts))
        elif code == ADD:
            out.append(Node("TFAdd", ins, outs, opts))
    return out
