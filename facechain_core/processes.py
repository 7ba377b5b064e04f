"""A lasting pool of helper processes, for CPU work made of many small numpy and OpenCV calls.

Threads run such work side by side only as far as the GIL lets them: each small call hands the GIL over
twice, and on a 16-core host FaceFusion's colour work stopped scaling at about two threads. A helper
process has a GIL of its own. The pool is for a host with cores to spare; the caller keeps its threads (a
thread hands its job to a free helper and waits, without the GIL, for the answer).

- Helpers are plain child processes of the same Python, started with ``-c`` (not ``multiprocessing``:
  its spawn and forkserver modes run the host's main script again in every child, which under ComfyUI
  would import all of ComfyUI and torch). Each imports only the modules its jobs name.
- Jobs are functions of this package named by ``"module:function"`` relative to it (the host imports the
  package under the pack folder's name, a helper as ``facechain_core``), taking and returning plain data
  (arrays, numbers, tuples: a class pickled under the host's package name would not load in a helper),
  pickled (protocol 5: numpy arrays travel as raw buffers, not copied into the pickle) over the helper's
  stdin and a private copy of its stdout (its fd 1 is pointed at stderr, so a stray print cannot break
  the stream).
- The pool starts in the background at its first use; until a helper is ready (and whenever one breaks)
  the job runs in the calling thread, so a first run is never slower than with threads alone. An
  exception raised in a helper is raised again in the caller (the pack's FaceChainError as itself).
- A helper reads jobs until its pipe closes: when the host ends, however it ends, its helpers end too.
"""

from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("facechain")

_U64 = struct.Struct("<Q")
_PACKAGE = __name__.rpartition(".")[0]  # "facechain_core" (or the pack's own prefix under a host)


def send(stream, obj: Any) -> None:
    """One message: the pickle's length and bytes, the number of raw buffers, then each buffer."""
    buffers: list = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    stream.write(_U64.pack(len(head)) + head + _U64.pack(len(buffers)))
    for buf in buffers:
        raw = buf.raw()
        stream.write(_U64.pack(raw.nbytes))
        stream.write(raw)
    stream.flush()


def _read_exact(stream, n: int) -> bytearray:
    out = bytearray(n)
    view, got = memoryview(out), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise EOFError("the helper process closed its pipe")
        got += k
    return out


def receive(stream) -> Any:
    """The next message (EOFError when the other side has gone)."""
    (n,) = _U64.unpack(_read_exact(stream, _U64.size))
    head = _read_exact(stream, n)
    (count,) = _U64.unpack(_read_exact(stream, _U64.size))
    buffers = []
    for _ in range(count):
        (size,) = _U64.unpack(_read_exact(stream, _U64.size))
        buffers.append(_read_exact(stream, size))
    return pickle.loads(head, buffers=buffers)


def _function(target: str) -> Callable:
    module, _, name = target.partition(":")
    if not module or not name or module.startswith("."):
        raise ValueError(f"a helper job is 'module:function' of {_PACKAGE}, not {target!r}")
    return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), name)


def serve() -> None:
    """A helper's loop: its settings, then jobs until the parent closes the pipe."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a print in some library goes to the log, not into the answers
    inp = sys.stdin.buffer
    settings = receive(inp)
    try:
        import cv2

        cv2.setNumThreads(int(settings.get("opencv_threads", 1)))
        for module in settings.get("preload", []):  # imported, and warmed up where the module says how
            warm_up = getattr(importlib.import_module(f"{_PACKAGE}.{module}"), "warm_up_helper", None)
            if warm_up is not None:
                warm_up()
        send(out, ("ready", os.getpid()))
    except BaseException as e:  # noqa: BLE001 - the parent logs why and keeps its threads
        send(out, ("broken", f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            target, args = receive(inp)
        except EOFError:
            return
        try:
            answer = ("ok", _function(target)(*args))
        except BaseException as e:  # noqa: BLE001 - raised again in the caller
            # by name, not pickled: the host knows this package's classes under another module name
            answer = ("error", type(e).__name__, str(e), traceback.format_exc())
        send(out, answer)


def _raise_again(name: str, message: str, trace: str) -> None:
    """A helper's exception in the caller: the pack's own errors (what the user is told) as they were, any
    other as a RuntimeError carrying the helper's traceback."""
    from .errors import FaceChainError

    if name == FaceChainError.__name__:
        raise FaceChainError(message)
    raise RuntimeError(f"{name} in a helper process: {message}\n{trace}")


class _Helper:
    def __init__(self, root: str, settings: dict):
        code = (f"import sys; sys.path[:] = {json.dumps(sys.path)}; sys.path.insert(0, {root!r}); "
                "from facechain_core.processes import serve; serve()")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=root)
        send(self.proc.stdin, settings)

    def wait_ready(self) -> None:
        answer = receive(self.proc.stdout)
        if answer[0] != "ready":
            raise RuntimeError(answer[1])

    def call(self, target: str, args: tuple) -> tuple:
        send(self.proc.stdin, (target, args))
        return receive(self.proc.stdout)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=2)
        except Exception:  # noqa: BLE001 - a helper that does not leave is ended
            self.proc.kill()


class ProcessPool:
    """``size`` helper processes; ``run`` gives a job to a free one, or runs it in the calling thread while
    none has started yet or after the pool broke."""

    def __init__(self, size: int, opencv_threads: int = 1, preload: tuple[str, ...] = ()):
        self.size = size
        self.settings = {"opencv_threads": opencv_threads, "preload": list(preload)}
        self._idle: queue.SimpleQueue = queue.SimpleQueue()
        self._alive = 0
        self._started = False
        self._lock = threading.Lock()
        self._helpers: list[_Helper] = []
        self._done = threading.Event()  # set once every helper is ready or has failed
        self.remote_jobs = 0  # how many jobs helpers ran (the tests read it)

    def start(self) -> None:
        """Start the helpers in the background (once)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._start_all, name="facechain-helpers", daemon=True).start()

    def _start_all(self) -> None:
        try:
            self._start_helpers()
        finally:
            self._done.set()

    def _start_helpers(self) -> None:
        root = str(Path(__file__).resolve().parents[1])
        try:
            helpers = [_Helper(root, self.settings) for _ in range(self.size)]
        except Exception as e:  # noqa: BLE001 - no helpers: the threads do the work
            log.warning("FaceChain: helper processes could not start (%s); the work stays in threads", e)
            return
        self._helpers = helpers
        for helper in helpers:
            try:
                helper.wait_ready()
            except Exception as e:  # noqa: BLE001
                log.warning("FaceChain: a helper process failed to start (%s); the work stays in threads", e)
                helper.close()
                continue
            with self._lock:
                self._alive += 1
            self._idle.put(helper)

    @property
    def ready(self) -> int:
        """How many helpers take jobs now."""
        return self._alive

    def wait(self, timeout: float | None = None) -> int:
        """Start the pool and wait until every helper is ready or failed; how many are ready."""
        self.start()
        self._done.wait(timeout)
        return self._alive

    def run(self, target: str, *args):
        """``target(*args)`` in a free helper (waiting for one when all are busy), or in this thread when
        none is ready. The helper's exception is raised here."""
        self.start()
        helper = self._free_helper()
        if helper is None:
            return _function(target)(*args)
        try:
            answer = helper.call(target, args)
        except (OSError, EOFError, pickle.PickleError) as e:
            with self._lock:
                self._alive -= 1
            log.warning("FaceChain: a helper process stopped (%s); its job runs in a thread", e)
            helper.proc.kill()
            if self._alive == 0:
                log.warning("FaceChain: no helper process left; the work stays in threads")
            return _function(target)(*args)
        self._idle.put(helper)
        self.remote_jobs += 1
        if answer[0] == "error":
            _raise_again(*answer[1:])
        return answer[1]

    def _free_helper(self) -> "_Helper | None":
        """A free helper, waiting while all are busy; None while none is ready (or none is left)."""
        while self._alive > 0:
            try:
                return self._idle.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    def close(self) -> None:
        with self._lock:
            self._alive = 0
        for helper in self._helpers:
            helper.close()
        self._helpers = []


_pools: dict[tuple, ProcessPool] = {}
_pools_lock = threading.Lock()


def pool(size: int, opencv_threads: int = 1, preload: tuple[str, ...] = ()) -> ProcessPool:
    """The one lasting pool of this shape (started at its first ``run``)."""
    key = (size, opencv_threads, preload)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = ProcessPool(size, opencv_threads, preload)
        return _pools[key]


@atexit.register
def _close_all() -> None:
    for p in list(_pools.values()):
        p.close()
