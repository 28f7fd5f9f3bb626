"""agenthub: a Python client for the agenthub task hub.

    import agenthub
    hub = agenthub.Hub("127.0.0.1:50051", token)
    task_id = hub.push(description="echo hi", needed_capabilities=["linux"])
    task = hub.wait(task_id, timeout=60)

``agenthub.aio.Hub`` has the same methods as coroutines / async iterators.
Timeouts are in seconds. The generated stubs are ``agenthub.v1.hub_pb2``
and ``agenthub.v1.hub_pb2_grpc``.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator, List, Optional, Tuple

import grpc

from agenthub._types import FINAL_STATES, OutputChunk, Task, TaskEvent, push_request, trace_metadata
from agenthub.v1 import hub_pb2 as pb
from agenthub.v1 import hub_pb2_grpc as pb_grpc

__all__ = ["Hub", "Task", "TaskEvent", "OutputChunk", "FINAL_STATES", "pb"]

LOG_ID_HEADER = "agenthub-log-id"
# A stream that broke for these reasons is opened again where it stopped.
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})


def channel_target(addr: str) -> Tuple[str, bool]:
    """(host:port, tls) from "host:port", "http://host:port" or "https://host:port"."""
    if addr.startswith("https://"):
        return addr[len("https://") :], True
    if addr.startswith("http://"):
        return addr[len("http://") :], False
    return addr, False


class Backoff:
    """Waits between reconnects: 0.1 s doubling up to ``limit``; reset on success."""

    def __init__(self, limit: float = 2.0) -> None:
        self.limit = limit
        self.next = 0.1

    def reset(self) -> None:
        self.next = 0.1

    def step(self) -> float:
        wait, self.next = self.next, min(self.next * 2, self.limit)
        return wait


class Hub:
    """A connection to a hub's gRPC API (``agenthub.v1.TaskHub``).

    ``addr``: "host:port" (or "https://host:port" for TLS, with ``ca_file``);
    default ``AGENTHUB_GRPC_ADDR`` or 127.0.0.1:50051. ``token``: an
    orchestrator, viewer or admin token; default ``AGENTHUB_TOKEN``.
    """

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
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root))
        else:
            self._channel = grpc.insecure_channel(target)
        self._auth = [("authorization", f"Bearer {token}")]
        self._max_retry = max_retry_interval
        self.stub = pb_grpc.TaskHubStub(self._channel)

    def __enter__(self) -> "Hub":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def push(self, *, traceparent: Optional[str] = None, **fields: Any) -> str:
        """PushTask with ``PushTaskRequest`` field names as keywords
        (``description``, ``agent_id``, ``metadata`` as a dict, ``depends_on``,
        ``queue_ttl_ms``, ``deadline_ms``, ``priority`` as "HIGH"...).
        The task joins the trace ``traceparent`` (W3C), else the current
        OpenTelemetry context if ``opentelemetry`` is installed.
        Returns the task id."""
        metadata = [*self._auth, *trace_metadata(traceparent)]
        resp = self.stub.PushTask(push_request(fields), metadata=metadata)
        return resp.task_id

    def get(self, task_id: str) -> Task:
        """GetTask."""
        return Task.from_pb(self.stub.GetTask(pb.GetTaskRequest(task_id=task_id), metadata=self._auth))

    def wait(self, task_id: str, timeout: Optional[float] = None) -> Task:
        """The task once it is finished, or after ``timeout`` seconds as it
        is then (check ``task.finished``). ``None``: wait as long as it takes
        (across hub restarts)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = Backoff(self._max_retry)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            req = pb.WaitTaskRequest(task_id=task_id, timeout_ms=0 if left is None else max(1, int(left * 1000)))
            try:
                return Task.from_pb(self.stub.WaitTask(req, metadata=self._auth))
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES or (deadline is not None and time.monotonic() >= deadline):
                    raise
            time.sleep(backoff.step())

    def cancel(self, task_id: str) -> Task:
        """CancelTask."""
        return Task.from_pb(self.stub.CancelTask(pb.CancelTaskRequest(task_id=task_id), metadata=self._auth))

    def list(self, state: Optional[str] = None, agent_id: str = "") -> List[Task]:
        """Every task (ListTasks, all pages), optionally of one state."""
        out: List[Task] = []
        token = ""
        while True:
            page = self.stub.ListTasks(
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

    def head(self) -> Tuple[int, str]:
        """(the last event seq, the log id): a cursor for "from now on"."""
        page = self.stub.ListTasks(pb.ListTasksRequest(page_size=1), metadata=self._auth)
        return page.as_of_seq, page.log_id

    def watch(
        self,
        after_seq: Optional[int] = None,
        *,
        task_id: str = "",
        agent_id: str = "",
        kinds: Optional[List[str]] = None,
    ) -> Iterator[TaskEvent]:
        """Task events after ``after_seq`` (``None``: from now on), forever.

        When the stream breaks (hub restart, network) it is opened again
        after the last event seen, with the log id, so nothing is missed or
        repeated; a cursor the hub cannot serve raises (OUT_OF_RANGE,
        FAILED_PRECONDITION)."""
        log_id: Optional[str] = None
        if after_seq is None:
            after_seq, log_id = self._retrying(self.head)
        backoff = Backoff(self._max_retry)
        kind_codes = [pb.TaskEvent.Kind.Value(k) for k in (kinds or [])]
        while True:
            req = pb.WatchTaskEventsRequest(
                after_seq=after_seq, task_id=task_id, agent_id=agent_id, kinds=kind_codes, log_id=log_id
            )
            stream = self.stub.WatchTaskEvents(req, metadata=self._auth)
            try:
                if log_id is None:
                    for k, v in stream.initial_metadata():
                        if k == LOG_ID_HEADER:
                            log_id = v
                for ev in stream:
                    backoff.reset()
                    after_seq = ev.seq
                    yield TaskEvent.from_pb(ev)
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES:
                    raise
            finally:
                stream.cancel()
            time.sleep(backoff.step())

    def output(self, task_id: str, after_offset: int = 0, follow: bool = True) -> Iterator[OutputChunk]:
        """The task's output from ``after_offset``: what is stored, then (with
        ``follow``) live output until the task is finished. Resumes by itself
        after a broken stream."""
        backoff = Backoff(self._max_retry)
        while True:
            req = pb.WatchTaskOutputRequest(task_id=task_id, after_offset=after_offset, stored_only=not follow)
            stream = self.stub.WatchTaskOutput(req, metadata=self._auth)
            try:
                for c in stream:
                    backoff.reset()
                    chunk = OutputChunk.from_pb(c)
                    after_offset = chunk.end
                    yield chunk
                # A clean end: the task finished (or the hub is stopping).
                if not follow or self._retrying(lambda: self.get(task_id)).finished:
                    return
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES:
                    raise
            finally:
                stream.cancel()
            time.sleep(backoff.step())

    def _retrying(self, call):  # type: ignore[no-untyped-def]
        backoff = Backoff(self._max_retry)
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                if e.code() not in RETRY_CODES:
                    raise
            time.sleep(backoff.step())
