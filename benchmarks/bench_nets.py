"""One embedded net's call, and what eight of them cost asked one by one, from eight threads, or as one batch.

    python benchmarks/bench_nets.py                 # on a CUDA machine: YuNet, SFace and the face mesh
    python benchmarks/bench_nets.py --device cpu    # smoke test (torch on the CPU, no CUDA graphs)
    python benchmarks/bench_nets.py --first-runs    # a new input shape's first runs, in fresh processes

The nets are the pack's own TorchNet programs of the embedded files (``onnx_torch``), as FaceFusion and RTSRank
run them on a GPU: YuNet on a 512x512 portrait (uint8, turned into the net's input on the device), SFace on its
112x112 crop, the mesh on its 192x192 crop. For each net, medians in ms:

- ``call``: one ``net(x)``; on a GPU split into ``copy_in``, ``replay`` (the CUDA graph, waited for) and
  ``copy_out``;
- ``serial8``: eight calls one after another; ``threads8``: eight threads asking the one net at once (its lock
  queues them); ``batch8``: the eight in one ``run_many`` (one copy in, one run, one copy out).

``--first-runs``: each of ``FIRST_RUN_CASES`` (a net, a batch size, a side; uint8 images in) run three times as a
new shape, then as a CUDA graph; once as the pack runs them (the images turned into an NCHW float input:
``TorchNet._as_input``) and once with the NCHW view of the images' channels-last memory, as before round five
(on a GPU that sends every convolution to cuDNN, depthwise ones too), each in a fresh process, plus the largest
difference between the two ways' outputs (relative to the output's largest value).

Prints one JSON line. Needs only torch and the embedded model files (``FACECHAIN_EMBEDDED_DIR``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from bench_paths import check_imports  # noqa: E402  (puts the checkout on sys.path)

NETS = {"yunet": ((512, 512, 3), "uint8"), "sface": ((1, 3, 112, 112), "float32"),
        "face_mesh": ((1, 3, 192, 192), "float32")}


FIRST_RUN_CASES = (("yunet", 8, 512), ("yunet", 8, 640), ("yunet", 1, 512), ("sface", 8, 112), ("face_mesh", 8, 192))
CONV_PATHS = ("pack", "nhwc")  # --first-runs: the pack's NCHW input, or the channels-last view (before round five)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    ap.add_argument("--first-runs", action="store_true", help="first runs of new shapes, in fresh processes")
    ap.add_argument("--conv-path", choices=CONV_PATHS, help=argparse.SUPPRESS)  # one fresh process's way
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--nets", default=",".join(NETS), help="comma-separated: " + ", ".join(NETS))
    return ap.parse_args(argv)


def median_ms(fn, repeats: int) -> float:
    fn()
    fn()  # first runs: graphs captured, kernels chosen
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 3)


def at_once(fn, n: int) -> float:
    """Seconds for ``n`` threads started together to each call ``fn`` once."""
    gate = threading.Barrier(n + 1)

    def work():
        gate.wait()
        fn()

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    gate.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def one_net(name: str, device: str, repeats: int) -> dict:
    import numpy as np
    import torch

    from facechain_core import model_store
    from facechain_core.onnx_torch import TorchNet

    shape, kind = NETS[name]
    net = TorchNet(model_store.embedded_path(name), device)
    rng = np.random.default_rng(0)
    xs = [(rng.random(shape) * 255).astype(np.uint8) if kind == "uint8" else rng.random(shape, dtype=np.float32)
          for _ in range(8)]
    row = {"call": median_ms(lambda: net(xs[0]), repeats)}
    if device == "cuda":
        x = torch.from_numpy(xs[0])
        graph, static_in, (flat, _) = net._graphs[(tuple(x.shape), x.dtype, 1)]

        def copy_in():
            with torch.inference_mode():
                static_in.copy_(x)
            torch.cuda.synchronize()

        row["copy_in"] = median_ms(copy_in, repeats)
        row["replay"] = median_ms(lambda: (graph.replay(), torch.cuda.synchronize()), repeats)
        row["copy_out"] = median_ms(lambda: flat.cpu(), repeats)
    row["serial8"] = median_ms(lambda: [net(x) for x in xs], max(3, repeats // 2))
    at_once(lambda: net(xs[0]), 8)
    row["threads8"] = round(statistics.median(at_once(lambda: net(xs[0]), 8) for _ in range(max(3, repeats // 2)))
                            * 1000, 3)
    row["batch8"] = median_ms(lambda: net.run_many(xs), max(3, repeats // 2))
    many, single = net.run_many(xs), [net(x) for x in xs]
    row["batch_kept"] = not net._no_batch
    row["batch_max_diff"] = float(max(np.abs(a - b).max() for m, s in zip(many, single) for a, b in zip(m, s)))
    return row


def _nhwc_input(x):
    """Round four's ``TorchNet._as_input``: the float copy keeps the permuted view's channels-last strides."""
    if x.dtype.is_floating_point:
        return x
    return x.permute(2, 0, 1)[None].float() if x.dim() == 3 else x.permute(0, 3, 1, 2).float()


def first_runs(device: str, path: str, repeats: int) -> dict:
    """This process's first three runs of each case (ms), its CUDA-graph call (median ms), and the largest
    difference of its outputs from the other way's."""
    import numpy as np
    import torch

    import facechain_core.onnx_torch as ot
    from facechain_core import model_store

    pack_input = ot.TorchNet.__dict__["_as_input"]
    ways = {"pack": pack_input, "nhwc": staticmethod(_nhwc_input)}
    ot.TorchNet._as_input = ways[path]
    other = ways["nhwc" if path == "pack" else "pack"]
    if device == "cuda":
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    nets, rows, rng = {}, [], np.random.default_rng(0)

    def run(net, x, b):
        with torch.inference_mode():
            out = net._forward(net._as_input(net._tensor(x).to(device)), b)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    for name, batch, side in FIRST_RUN_CASES:
        if name not in nets:
            nets[name] = ot.TorchNet(model_store.embedded_path(name), device)
        net = nets[name]
        x = rng.integers(0, 256, (batch, side, side, 3), dtype=np.uint8)
        first = []
        for _ in range(3):
            t = time.perf_counter()
            mine = run(net, x, batch)
            first.append(round((time.perf_counter() - t) * 1000, 1))
        call = median_ms(lambda: net._outputs(net._tensor(x), batch, capture=True), repeats)
        ot.TorchNet._as_input, keep = other, ot.TorchNet.__dict__["_as_input"]
        theirs = run(net, x, batch)
        ot.TorchNet._as_input = keep
        diff = max(float((a - b).abs().max() / (b.abs().max() + 1e-6)) for a, b in zip(mine, theirs))
        rows.append({"net": name, "batch": batch, "side": side, "first_runs_ms": first, "call_ms": call,
                     "max_rel_diff": diff})
    return {"path": path, "cases": rows}


def first_runs_fresh(args) -> dict:
    """``first_runs`` for each convolution path, each in a fresh process (a process plans a shape once)."""
    import subprocess
    import sys

    out = {}
    for path in CONV_PATHS:
        cmd = [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats), "--conv-path", path]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"--conv-path {path} failed:\n{done.stderr[-4000:]}")
        out[path] = json.loads(done.stdout.strip().splitlines()[-1])["cases"]
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    check_imports(["torch", "numpy"])
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --device cpu for a smoke test")
    if args.conv_path:
        print(json.dumps(first_runs(args.device, args.conv_path, args.repeats)), flush=True)
        return
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    if args.first_runs:
        result["first_runs"] = first_runs_fresh(args)
        print(json.dumps(result), flush=True)
        return
    for name in [n.strip() for n in args.nets.split(",") if n.strip()]:
        if name not in NETS:
            raise SystemExit(f"unknown net {name!r}; choose from {', '.join(NETS)}")
        result[name] = one_net(name, args.device, args.repeats)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
