"""A lasting pool of helper processes, for CPU work made of many small numpy and OpenCV calls.

Threads run such work side by side only as far as the GIL lets them: each small call hands the GIL over
twice, and on a 16-core host FaceFusion's colour work stopped scaling at about two threads. A helper
process has a GIL of its own. The pool is for a host with cores to spare; the caller keeps its threads (a
thread hands its job to a free helper and waits, without the GIL, for the answer: ``run``; or, for a job
that yields its results, goes on at once and takes each part as it comes: ``run_parts``).

- Helpers are plain child processes of the same Python, started with ``-c`` (not ``multiprocessing``:
  its spawn and forkserver modes run the host's main script again in every child, which under ComfyUI
  would import all of ComfyUI and torch). Each imports only the modules its jobs name.
- Jobs are functions of this package named by ``"module:function"`` relative to it (the host imports the
  package under the pack folder's name, a helper as ``facechain_core``), taking and returning plain data
  (arrays, numbers, strings, tuples, lists, dicts): an object of this package's classes is refused before it
  is sent, since it would not load on the other side. Messages are pickles (protocol 5: numpy arrays travel
  as raw buffers, not copied into the pickle) over the helper's stdin and a private copy of its stdout (its
  fd 1 is pointed at stderr, so a stray print cannot break the stream).
- The pool starts in the background at its first use; while it starts the caller is told no helper is
  ready (``ready``) and does the work itself, and a helper that breaks sends its job back to the caller's
  thread. The pack's own errors raised in a helper are raised again in the caller as they were; any other
  error as a RuntimeError with the helper's traceback.
- A helper reads jobs until its pipe closes: when the host ends, however it ends, its helpers end too.
  Ctrl+C in the host's terminal is the host's to handle: helpers ignore it.
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import io
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("comfyui-facechain")  # the pack's logger, as the nodes'

_U64 = struct.Struct("<Q")
_PACKAGE = __name__.rpartition(".")[0]  # "facechain_core" (or the pack's own prefix under a host)
START_TIMEOUT_S = 60.0  # a helper not ready by then is ended (its jobs stay in threads)


class _PlainPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if type(obj).__module__.startswith(_PACKAGE + "."):
            raise TypeError(f"a helper job takes plain data, not a {type(obj).__name__} (the helper knows this "
                            f"package's classes under another name)")
        return NotImplemented


def encode(obj: Any) -> list:
    """A message as the pieces to write: the pickle's length and bytes, the number of raw buffers, then each
    buffer's length and bytes. Pickling happens here, before anything is written."""
    buffers: list = []
    head = io.BytesIO()
    _PlainPickler(head, protocol=5, buffer_callback=buffers.append).dump(obj)
    head = head.getvalue()
    pieces = [_U64.pack(len(head)) + head + _U64.pack(len(buffers))]
    for buf in buffers:
        raw = buf.raw()
        pieces += [_U64.pack(raw.nbytes), raw]
    return pieces


def write(stream, pieces: list) -> None:
    """Write an encoded message and flush."""
    for piece in pieces:
        stream.write(piece)
    stream.flush()


def send(stream, obj: Any) -> None:
    """Write one message (``encode``) and flush."""
    write(stream, encode(obj))


def _read_exact(stream, n: int) -> bytearray:
    """Exactly ``n`` bytes from ``stream`` (EOFError if it ends first)."""
    out = bytearray(n)
    view, got = memoryview(out), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise EOFError("the helper process closed its pipe")
        got += k
    return out


def read_message(stream) -> tuple[bytearray, list]:
    """The next message's pickle and buffers, not yet unpickled (EOFError when the other side has gone)."""
    (n,) = _U64.unpack(_read_exact(stream, _U64.size))
    head = _read_exact(stream, n)
    (count,) = _U64.unpack(_read_exact(stream, _U64.size))
    buffers = []
    for _ in range(count):
        (size,) = _U64.unpack(_read_exact(stream, _U64.size))
        buffers.append(_read_exact(stream, size))
    return head, buffers


def receive(stream) -> Any:
    """The next message (EOFError when the other side has gone)."""
    head, buffers = read_message(stream)
    return pickle.loads(head, buffers=buffers)


def _function(target: str) -> Callable:
    """The function a job names: ``"module:function"`` of this package."""
    module, _, name = target.partition(":")
    if not module or not name or module.startswith("."):
        raise ValueError(f"a helper job is 'module:function' of {_PACKAGE}, not {target!r}")
    return getattr(importlib.import_module(f"{_PACKAGE}.{module}"), name)


def _whole(result):
    """A job's result as a helper answers it: a job in parts (a generator) as the list of its parts."""
    return list(result) if inspect.isgenerator(result) else result


def _error(e: BaseException) -> tuple:
    # by name, not pickled: the host knows this package's classes under another module name
    return ("error", type(e).__name__, str(e), traceback.format_exc())


def serve() -> None:
    """A helper's loop: its settings, then jobs until the parent closes the pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides what Ctrl+C stops
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a print in some library goes to the log, not into the answers
    inp = sys.stdin.buffer
    settings = receive(inp)
    try:
        sys.path[:] = settings["sys_path"]
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
            head, buffers = read_message(inp)
        except EOFError:
            return
        try:
            target, args = pickle.loads(head, buffers=buffers)
            answer = ("ok", _function(target)(*args))
            if inspect.isgenerator(answer[1]):  # a job in parts: each sent as it is made, then the end
                for part in answer[1]:
                    write(out, encode(("part", part)))
                answer = ("end", None)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller
            answer = _error(e)
        try:
            pieces = encode(answer)
        except BaseException as e:  # noqa: BLE001 - an answer that is not plain data
            pieces = encode(_error(e))
        write(out, pieces)


def _raise_again(name: str, message: str, trace: str) -> None:
    """A helper's exception in the caller: the pack's own errors (what the user is told) as they were, any
    other as a RuntimeError carrying the helper's traceback."""
    raise _again(name, message, trace)


def _again(name: str, message: str, trace: str) -> BaseException:
    from . import errors

    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.FaceChainError):
        return cls(message)
    return RuntimeError(f"{name} in a helper process: {message}\n{trace}")


class HelperBroke(RuntimeError):
    """The helper running a job in parts stopped before its last part (the caller makes the rest itself)."""


_arrived = threading.Condition()  # told of every part that comes (and of every job's end), for ``wait_any``


class Parts:
    """The parts a helper's job yields, as they come (read in the background): ``get(i)`` waits for the
    ``i``-th; the job's error, or ``HelperBroke``, when it never comes."""

    def __init__(self):
        self._got: list = []
        self._error: BaseException | None = None
        self._ended = False
        self._cond = threading.Condition()

    def _put(self, value) -> None:
        with self._cond:
            self._got.append(value)
            self._cond.notify_all()
        with _arrived:
            _arrived.notify_all()

    def _end(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._ended, self._error = True, error
            self._cond.notify_all()
        with _arrived:
            _arrived.notify_all()

    def get(self, i: int):
        with self._cond:
            self._cond.wait_for(lambda: len(self._got) > i or self._ended)
            if i < len(self._got):
                return self._got[i]
            if self._error is not None:
                raise self._error
            raise IndexError(f"the job gave {len(self._got)} parts, not {i + 1}")

    def has(self, i: int) -> bool:
        """Whether ``get(i)`` would answer (the part, or why it never comes) without waiting."""
        with self._cond:
            return len(self._got) > i or self._ended


def wait_any(asks: list[tuple["Parts", int]], timeout: float | None = None) -> bool:
    """Wait until one of the (parts, i) asked for has its part (or its end); False after ``timeout`` s."""
    with _arrived:
        return _arrived.wait_for(lambda: any(p.has(i) for p, i in asks), timeout)


class _Helper:
    """One helper process and its two pipes."""

    def __init__(self, root: str, settings: dict):
        code = f"import sys; sys.path.insert(0, {root!r}); from facechain_core.processes import serve; serve()"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=root, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        send(self.proc.stdin, {**settings, "sys_path": [root] + list(sys.path)})

    def wait_ready(self, timeout: float) -> None:
        """Until the helper says it is ready (RuntimeError if it says it is broken; it is ended after
        ``timeout`` s, which reads as EOFError)."""
        timer = threading.Timer(timeout, self.proc.kill)
        timer.daemon = True
        timer.start()
        try:
            answer = receive(self.proc.stdout)
        finally:
            timer.cancel()
        if answer[0] != "ready":
            raise RuntimeError(answer[1])

    def end(self) -> None:
        """Close its input (it leaves at once when idle) without waiting."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def reap(self, deadline: float) -> None:
        """Wait for it to leave until ``deadline`` (time.monotonic), then end it; close its pipes."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class ProcessPool:
    """``size`` helper processes; ``run`` gives a job to a free one, or runs it in the calling thread while
    the pool is still starting or after its helpers broke."""

    def __init__(self, size: int, opencv_threads: int = 1, preload: tuple[str, ...] = ()):
        self.size = size
        self.settings = {"opencv_threads": opencv_threads, "preload": list(preload)}
        # the helper freed last is taken first: the ones in use stay warm (a helper's first job of a kind is
        # slow: its first calls set up tables and memory), the others wait
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._alive = 0
        self._started = False
        self._lock = threading.Lock()
        self._helpers: list[_Helper] = []
        self._done = threading.Event()  # set once every helper is ready or has failed
        self._closed = False
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
            for _ in range(self.size):  # all started before any is waited for: they start side by side
                self._helpers.append(_Helper(root, self.settings))
        except Exception as e:  # noqa: BLE001 - no helpers: the threads do the work
            log.warning("FaceChain: helper processes could not start (%s); the work stays in threads", e)
            self._discard(*self._helpers)
            return
        for helper in list(self._helpers):
            try:
                helper.wait_ready(START_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001
                log.warning("FaceChain: a helper process failed to start (%s); the work stays in threads", e)
                self._discard(helper)
                continue
            with self._lock:
                if self._closed:  # closed while it started
                    break
                self._alive += 1
            self._idle.put(helper)
        with self._lock:
            ready, closed = self._alive, self._closed
        if closed:
            self._discard(*self._helpers)
        elif ready:
            log.info("FaceChain: %d helper processes ready for FaceFusion", ready)

    def _discard(self, *helpers: _Helper) -> None:
        for helper in helpers:
            helper.proc.kill()
            helper.reap(time.monotonic() + 5)
            with self._lock:
                if helper in self._helpers:
                    self._helpers.remove(helper)

    @property
    def ready(self) -> int:
        """How many helpers take jobs now."""
        return max(0, self._alive)

    def wait(self, timeout: float | None = None) -> int:
        """Start the pool and wait until every helper is ready or failed; how many are ready."""
        self.start()
        self._done.wait(timeout)
        return self._alive

    def _free_helper(self) -> "_Helper | None":
        """A free helper; while the pool is still starting and none is free, None (the caller works), after
        that the first to become free; None when none is left."""
        while self._alive > 0:
            try:
                return self._idle.get(timeout=0.2) if self._done.is_set() else self._idle.get_nowait()
            except queue.Empty:
                if not self._done.is_set():
                    return None
        return None

    def run(self, target: str, *args, fallback=None):
        """``target(*args)`` in a free helper, or in this thread when none is (see ``_free_helper``) or the
        helper breaks on it: then ``fallback()`` when given (work a thread does better another way), else
        ``target(*args)``. The helper's exception is raised here. A job in parts comes back as their list."""
        self.start()
        in_thread = fallback or (lambda: _whole(_function(target)(*args)))
        helper = self._sent(target, args)
        if helper is None:
            return in_thread()
        got = []
        try:
            answer = self._answer(helper, target)
            while answer[0] == "part":
                got.append(answer[1])
                answer = self._answer(helper, target)
        except BaseException as e:
            if not self._broke(helper, e):
                raise
            return in_thread()
        self._done_with(helper)
        if answer[0] == "error":
            _raise_again(*answer[1:])
        return got if answer[0] == "end" else answer[1]

    def run_parts(self, target: str, *args, fallback=None) -> "Parts | Any":
        """A job that yields its results (a generator) in a free helper: a ``Parts`` at once, filled in the
        background as the helper sends each part (it is free again after the last). With no helper free (see
        ``_free_helper``), or one that breaks as the job is sent: ``fallback()`` in this thread, or the list
        of the parts made here. A helper that breaks later ends the ``Parts`` with ``HelperBroke``."""
        self.start()
        helper = self._sent(target, args)
        if helper is None:
            return fallback() if fallback else _whole(_function(target)(*args))
        parts = Parts()
        threading.Thread(target=self._read_parts, args=(helper, target, parts), daemon=True,
                         name="facechain-helper-parts").start()
        return parts

    def _sent(self, target: str, args: tuple) -> "_Helper | None":
        """A free helper, the job sent to it; None when none is free or the one taken broke as it was sent
        (the caller then works itself)."""
        pieces = encode((target, args))  # a TypeError for data that is not plain, before any helper is taken
        helper = self._free_helper()
        if helper is None:
            return None
        try:
            write(helper.proc.stdin, pieces)
        except BaseException as e:
            if not self._broke(helper, e):
                raise
            return None
        return helper

    def _read_parts(self, helper: _Helper, target: str, parts: Parts) -> None:
        error: BaseException | None = RuntimeError(f"the parts of {target} were not read")
        try:
            while True:
                answer = self._answer(helper, target)
                if answer[0] != "part":
                    break
                parts._put(answer[1])
            self._done_with(helper)
            error = _again(*answer[1:]) if answer[0] == "error" else None
            if error is not None:  # raised where a part it did not make is asked for; said here in any case
                log.warning("FaceChain: a helper's job %s ended with %s after %d parts", target,
                            answer[1], len(parts._got))
        except BaseException as e:  # noqa: BLE001 - told to the caller through the parts
            try:
                broke = self._broke(helper, e)
                error = HelperBroke(f"a helper process stopped during {target}: {e}") if broke else e
            except BaseException as again:  # noqa: BLE001
                error = again
        finally:
            parts._end(error)

    def _answer(self, helper: _Helper, target: str) -> tuple:
        """The helper's next message, unpickled. One that cannot be read is a RuntimeError, and the helper is
        then ended (``_broke``): whether more of the job's messages follow cannot be known."""
        head, buffers = read_message(helper.proc.stdout)
        try:
            return pickle.loads(head, buffers=buffers)
        except Exception as e:
            raise RuntimeError(f"a helper's answer to {target} could not be read: {type(e).__name__}: {e}") from e

    def _broke(self, helper: _Helper, e: BaseException) -> bool:
        """A helper whose pipe failed under a job is ended; True when that is what ``e`` says (the job then
        goes to a thread), False for any other error (raised)."""
        with self._lock:
            self._alive = max(0, self._alive - 1)
        self._discard(helper)
        if not isinstance(e, (OSError, EOFError, ValueError)):  # ValueError: a pipe closed under it
            return False
        log.warning("FaceChain: a helper process stopped (%s); its job runs in a thread", e)
        if self._alive == 0:
            log.warning("FaceChain: no helper process left; the work stays in threads")
        return True

    def _done_with(self, helper: _Helper) -> None:
        self._idle.put(helper)  # the stream is whole: the helper stays, whatever its answers held
        with self._lock:
            self.remote_jobs += 1

    def close(self) -> None:
        """End every helper (closing their input; those still busy after 2 s are killed)."""
        with self._lock:
            self._closed = True
            self._alive = 0
            helpers, self._helpers = list(self._helpers), []
        for helper in helpers:
            helper.end()
        deadline = time.monotonic() + 2.0
        for helper in helpers:
            helper.reap(deadline)


_pools: dict[tuple, ProcessPool] = {}
_pools_lock = threading.Lock()


def pool(size: int, opencv_threads: int = 1, preload: tuple[str, ...] = ()) -> ProcessPool:
    """The one lasting pool of this shape (started at its first ``run`` or ``start``)."""
    key = (size, opencv_threads, preload)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = ProcessPool(size, opencv_threads, preload)
        return _pools[key]


@atexit.register
def _close_all() -> None:
    for p in list(_pools.values()):
        p.close()
