"""The asyncio client: ``agenthub.aio.Hub`` has the methods of
``agenthub.Hub`` as coroutines (``push``, ``get``, ``wait``, ``cancel``,
``list``, ``head``) and async iterators (``watch``, ``output``)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator, Awaitable, Callable, List, Optional, Tuple, TypeVar

import grpc
import grpc.aio

from agenthub import LOG_ID_HEADER, RETRY_CODES, Backoff, channel_target
from agenthub._types import OutputChunk, Task, TaskEvent, push_request, trace_metadata
from agenthub.v1 import hub_pb2 as pb
from agenthub.v1 import hub_pb2_grpc as pb_grpc

__all__ = ["Hub"]

T = TypeVar("T")


class Hub:
    """An asyncio connection to a hub (see ``agenthub.Hub`` for the arguments)."""

    def __init__(
        self,
        addr: Optional[str] = None,
        token: Optional[str] = None,
        *,
        ca_file: Optional[str] = None,
        max_retry_interval: float = 2.0,
    ) -> None:
        addr = addr or os.environ.get("AGENTHUB_GRPC_ADDR", "127.0.0.1:50051")
        token = token or os.environ.get("AGENTHUB_TOKEN", "")
        target, tls = channel_target(addr)
        if tls or ca_file:
            root = open(ca_file, "rb").read() if ca_file else None
            self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root))
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._auth = (("authorization", f"Bearer {token}"),)
        self._max_retry = max_retry_interval
        self.stub = pb_grpc.TaskHubStub(self._channel)

    async def __aenter__(self) -> "Hub":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def push(self, *, traceparent: Optional[str] = None, **fields: Any) -> str:
        """PushTask with ``PushTaskRequest`` field names as keywords; the task
        id. Trace context as in ``agenthub.Hub.push``."""
        metadata = [*self._auth, *trace_metadata(traceparent)]
        resp = await self.stub.PushTask(push_request(fields), metadata=metadata)
        return resp.task_id

    async def get(self, task_id: str) -> Task:
        return Task.from_pb(await self.stub.GetTask(pb.GetTaskRequest(task_id=task_id), metadata=self._auth))

    async def wait(self, task_id: str, timeout: Optional[float] = None) -> Task:
        """The task once finished, or after ``timeout`` seconds as it is then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff(self._max_retry)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            req = pb.WaitTaskRequest(task_id=task_id, timeout_ms=0 if left is None else max(1, int(left * 1000)))
            try:
                return Task.from_pb(await self.stub.WaitTask(req, metadata=self._auth))
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES or (deadline is not None and time.monotonic() >= deadline):
                    raise
            await asyncio.sleep(backoff.step())

    async def cancel(self, task_id: str) -> Task:
        return Task.from_pb(await self.stub.CancelTask(pb.CancelTaskRequest(task_id=task_id), metadata=self._auth))

    async def list(self, state: Optional[str] = None, agent_id: str = "") -> List[Task]:
        out: List[Task] = []
        token = ""
        while True:
            page = await self.stub.ListTasks(
                pb.ListTasksRequest(
                    state=pb.Task.State.Value(state) if state else 0,
                    agent_id=agent_id,
                    page_size=1000,
                    page_token=token,
                ),
                metadata=self._auth,
            )
            out.extend(Task.from_pb(t) for t in page.tasks)
            if not page.next_page_token:
                return out
            token = page.next_page_token

    async def head(self) -> Tuple[int, str]:
        page = await self.stub.ListTasks(pb.ListTasksRequest(page_size=1), metadata=self._auth)
        return page.as_of_seq, page.log_id

    async def watch(
        self,
        after_seq: Optional[int] = None,
        *,
        task_id: str = "",
        agent_id: str = "",
        kinds: Optional[List[str]] = None,
    ) -> AsyncIterator[TaskEvent]:
        """Task events after ``after_seq`` (``None``: from now on), resuming
        by itself after a broken stream."""
        log_id: Optional[str] = None
        if after_seq is None:
            after_seq, log_id = await self._retrying(self.head)
        backoff = Backoff(self._max_retry)
        kind_codes = [pb.TaskEvent.Kind.Value(k) for k in (kinds or [])]
        while True:
            req = pb.WatchTaskEventsRequest(
                after_seq=after_seq, task_id=task_id, agent_id=agent_id, kinds=kind_codes, log_id=log_id
            )
            call = self.stub.WatchTaskEvents(req, metadata=self._auth)
            try:
                if log_id is None:
                    for k, v in (await call.initial_metadata()) or ():
                        if k == LOG_ID_HEADER:
                            log_id = v
                async for ev in call:
                    backoff.reset()
                    after_seq = ev.seq
                    yield TaskEvent.from_pb(ev)
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(backoff.step())

    async def output(self, task_id: str, after_offset: int = 0, follow: bool = True) -> AsyncIterator[OutputChunk]:
        """The task's output from ``after_offset``; with ``follow``, live
        output until the task is finished."""
        backoff = Backoff(self._max_retry)
        while True:
            req = pb.WatchTaskOutputRequest(task_id=task_id, after_offset=after_offset, stored_only=not follow)
            call = self.stub.WatchTaskOutput(req, metadata=self._auth)
            try:
                async for c in call:
                    backoff.reset()
                    chunk = OutputChunk.from_pb(c)
                    after_offset = chunk.end
                    yield chunk
                if not follow or (await self._retrying(lambda: self.get(task_id))).finished:
                    return
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES:
                    raise
            finally:
                call.cancel()
            await asyncio.sleep(backoff.step())

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        backoff = Backoff(self._max_retry)
        while True:
            try:
                return await call()
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES:
                    raise
            await asyncio.sleep(backoff.step())
