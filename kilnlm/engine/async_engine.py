"""``AsyncLLMEngine``: the engine's step loop in a background thread, streams to asyncio.

Why a thread: a step is mostly torch kernels, which release the GIL, so the event loop (the
Serve replica's, the gateway's) keeps answering while the engine computes. The engine itself
is not thread-safe, so every call that changes it (add, abort, stage install, commit) is sent
to the loop thread as a command and runs between two steps, i.e. at a step boundary; callers
await a future for its result or error. Outputs travel back through one asyncio queue per
request.

If a consumer stops iterating ``generate`` (its task is cancelled, or it closes the
generator), the request is aborted: the abort runs at the next boundary, so its blocks are
free within one step. Torch threads are the caller's business (``torch.set_num_threads``).

Which weights serve is the engine's snapshot (serving.py); ``reading()`` leases it for a
reader that needs the weights (scoring, evaluation), ``snapshot()`` reads it without the
weights (info), ``wait_serving(version)`` waits for a flip, and ``flips`` counts them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

from torch import Tensor

from kilnlm.engine.engine import LLMEngine
from kilnlm.engine.request import RequestOutput
from kilnlm.engine.serving import Snapshot, VersionRule
from kilnlm.engine.weights import prepare
from kilnlm.errors import InvalidArgumentError
from kilnlm.model import Transformer
from kilnlm.sampling import SamplingParams

T = TypeVar("T")


class EngineDead(RuntimeError):
    """The step loop has stopped (shut down, or crashed: the cause is chained)."""


class AsyncLLMEngine:
    """Asyncio front of an ``LLMEngine`` whose steps run in a background thread."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        Command = tuple[Callable[[], Any], concurrent.futures.Future[Any]]
        self._commands: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._stats = engine.stats()
        self._error: BaseException | None = None
        self._stopping = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        engine.serving.add_listener(self._serving_changed)
        self._thread = threading.Thread(target=self._run, name="kilnlm-engine", daemon=True)
        self._thread.start()

    # ---- public API ------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_ids: Any,
        params: SamplingParams | None = None,
        deadline: float | None = None,
        versions: VersionRule | None = None,
        resume: Sequence[int] = (),
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs (deltas) until the finished one.

        Raises ValueError / QueueFull from ``LLMEngine.add_request`` before the first output,
        the engine's VersionError when ``versions`` rejects the version it would run on,
        EngineDead if the loop stops. Leaving the loop early aborts the request.
        """
        if request_id in self._streams:
            raise InvalidArgumentError(f"request_id {request_id!r} is already in use", "request_id")
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        try:
            await self._call(
                lambda: self.engine.add_request(
                    request_id, prompt_ids, params, deadline, versions, resume
                )
            )
        except BaseException as e:
            self._streams.pop(request_id, None)
            if isinstance(e, asyncio.CancelledError):  # it may have been added already
                self._send(lambda: self.engine.abort(request_id))
            raise
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                if item.error is not None:
                    raise item.error
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send(lambda: self.engine.abort(request_id))

    async def abort(self, request_id: str) -> bool:
        return await self._call(lambda: self.engine.abort(request_id))

    async def stage(
        self, source: Transformer | Mapping[str, Tensor], version: int, payload: Any = None
    ) -> float:
        """Phase 1: load and check in a worker thread (serving continues), install at a boundary.
        Returns the seconds loading took; raises ValueError on a mismatch, serving untouched."""
        serving = await self._call(lambda: self.engine.check_stage_version(version))
        mode = self.engine.config.swap_mode
        staged = await asyncio.to_thread(prepare, serving, source, version, mode, payload)
        await self._call(lambda: self.engine.install_stage(staged))
        return staged.stage_s

    async def commit(self, version: int) -> None:
        """Phase 2: flip at the next step boundary (drain mode: once the old requests end)."""
        await self._call(lambda: self.engine.commit(version))

    async def abort_stage(self) -> bool:
        return await self._call(self.engine.abort_stage)

    # ---- which weights serve ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """What serves now: for labels and shapes only (reading the weights needs ``reading``)."""
        return self.engine.serving.current

    @property
    def flips(self) -> int:
        """How many times the engine has flipped to new weights."""
        return self.engine.serving.flips

    @property
    def committing_version(self) -> int | None:
        return self.engine.committing_version

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[Snapshot]:
        """Lease the serving snapshot while reading its weights: a drain flip (which copies new
        weights into the same tensors) waits until the lease ends. While a drain flip is
        pending this waits for it, so the reader gets the new weights."""
        serving = self.engine.serving
        while (snapshot := serving.try_lease()) is None:
            await self._changed(lambda: not serving.holding)
        try:
            yield snapshot
        finally:
            serving.release(snapshot)

    async def wait_serving(self, version: int) -> None:
        """Return once ``version`` serves (after its commit, at the engine's flip)."""
        await self._changed(lambda: self.snapshot().version == version)

    async def _changed(self, done: Callable[[], bool]) -> None:
        """Wait until ``done()`` holds, re-checking after every change of the serving state."""
        while not done():
            if not self.healthy:
                raise EngineDead("the engine loop has stopped")
            event = asyncio.Event()
            waiter = (asyncio.get_running_loop(), event)
            self._waiters.append(waiter)
            try:
                if done():
                    return
                with contextlib.suppress(TimeoutError):  # also notices a dead loop
                    await asyncio.wait_for(event.wait(), 1.0)
            finally:
                self._waiters.remove(waiter)

    def _serving_changed(self) -> None:
        """Listener of the engine's serving state (any thread): wake the waiters."""
        for loop, event in list(self._waiters):
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(event.set)

    def stats(self) -> dict[str, Any]:
        """The engine's stats as of the last step (no waiting on the loop)."""
        return dict(self._stats)

    @property
    def healthy(self) -> bool:
        return self._error is None and not self._stopping and self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort what is left (clients get finish_reason "abort"), stop the loop, join it."""
        if self._stopping:
            return
        self._stopping = True
        self._commands.put(None)  # wake an idle loop
        self._thread.join(timeout)

    # ---- the loop thread -------------------------------------------------------------------

    def _call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run fn on the loop thread at the next step boundary; await its result."""
        return asyncio.wrap_future(self._send(fn))

    def _send(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:  # nothing may be queued once the loop has drained the queue for good
            if self._closed:
                future.set_exception(EngineDead("the engine loop has stopped"))
            else:
                self._commands.put((fn, future))
        return future

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            while not self._stopping:
                self._run_commands(block=not self.engine.has_unfinished(), idle=self._idle())
                if self.engine.has_unfinished() and not self._stopping:
                    self._deliver(self.engine.step())
                    self._stats = self.engine.stats()
            for request_id in list(self.engine.requests):
                self.engine.abort(request_id)
            self._deliver(self.engine.step())
            self._stats = self.engine.stats()
            error = EngineDead("the engine was shut down")
        except BaseException as e:
            self._error = e
            error = EngineDead(f"the engine loop crashed: {e!r}")
            error.__cause__ = e
        finally:
            with self._lock:
                self._closed = True
            self._fail_all(error or EngineDead("the engine loop has stopped"))

    def _idle(self) -> bool:
        """Nothing to compute, only a flip waiting for readers: don't spin the step loop."""
        return not self.engine.requests and self.engine.committing_version is not None

    def _run_commands(self, block: bool, idle: bool = False) -> None:
        try:
            command = self._commands.get(block=block or idle, timeout=0.005 if idle else None)
        except queue.Empty:
            return
        while True:
            if command is not None:
                fn, future = command
                if future.set_running_or_notify_cancel():  # else the caller gave up first
                    try:
                        future.set_result(fn())
                    except BaseException as e:
                        future.set_exception(e)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up per event loop per step, not one
        per request (each ``call_soon_threadsafe`` writes the loop's self-pipe: 32 streams made
        32 syscalls and 32 loop wake-ups per step)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                batches.setdefault(entry[0], []).append((entry[1], out))
        for loop, items in batches.items():
            with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody listens
                loop.call_soon_threadsafe(_put_all, items)

    def _put(self, request_id: str, item: Any) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        loop, outputs = entry
        with contextlib.suppress(RuntimeError):  # that event loop is closed: nobody listens
            loop.call_soon_threadsafe(outputs.put_nowait, item)

    def _fail_all(self, error: BaseException) -> None:
        for request_id in list(self._streams):
            self._put(request_id, error)
        while True:  # commands nobody will run
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not None and command[1].set_running_or_notify_cancel():
                command[1].set_exception(error)


def _put_all(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for outputs, item in items:
        outputs.put_nowait(item)


__all__ = ["AsyncLLMEngine", "EngineDead"]
