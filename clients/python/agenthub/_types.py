"""Plain Python views of the hub's messages: dicts for JSON, strings for enums."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from google.protobuf import json_format, struct_pb2

from agenthub.v1 import hub_pb2 as pb

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED"})


def _value(v: Optional[struct_pb2.Value], present: bool) -> Any:
    if not present or v is None:
        return None
    return json_format.MessageToDict(v)


def _struct(s: struct_pb2.Struct) -> Dict[str, Any]:
    return json_format.MessageToDict(s)


def to_struct(d: Optional[Dict[str, Any]]) -> Optional[struct_pb2.Struct]:
    if d is None:
        return None
    s = struct_pb2.Struct()
    s.update(d)
    return s


@dataclass
class Task:
    """A task as GetTask / WaitTask return it."""

    task_id: str
    agent_id: str
    description: str
    metadata: Dict[str, Any]
    state: str
    generation: int
    attempts: int
    max_attempts: int
    needed_capabilities: List[str]
    priority: str
    result: Any
    error: Any
    created_at_ms: int
    updated_at_ms: int
    last_seq: int
    pinned: bool
    depends_on: List[str] = field(default_factory=list)
    queue_ttl_ms: int = 0
    deadline_ms: int = 0

    @property
    def finished(self) -> bool:
        """COMPLETED, FAILED or CANCELLED."""
        return self.state in FINAL_STATES

    @classmethod
    def from_pb(cls, t: pb.Task) -> "Task":
        return cls(
            task_id=t.task_id,
            agent_id=t.agent_id,
            description=t.description,
            metadata=_struct(t.metadata),
            state=pb.Task.State.Name(t.state),
            generation=t.generation,
            attempts=t.attempts,
            max_attempts=t.max_attempts,
            needed_capabilities=list(t.needed_capabilities),
            priority=pb.Priority.Name(t.priority),
            result=_value(t.result, t.HasField("result")),
            error=_value(t.error, t.HasField("error")),
            created_at_ms=t.created_at_ms,
            updated_at_ms=t.updated_at_ms,
            last_seq=t.last_seq,
            pinned=t.pinned,
            depends_on=list(t.depends_on),
            queue_ttl_ms=t.queue_ttl_ms,
            deadline_ms=t.deadline_ms,
        )


@dataclass
class TaskEvent:
    """One change to a task (WatchTaskEvents)."""

    seq: int
    task_id: str
    agent_id: str
    kind: str
    generation: int
    payload: Dict[str, Any]
    timestamp_ms: int
    state: str

    @classmethod
    def from_pb(cls, e: pb.TaskEvent) -> "TaskEvent":
        return cls(
            seq=e.seq,
            task_id=e.task_id,
            agent_id=e.agent_id,
            kind=pb.TaskEvent.Kind.Name(e.kind),
            generation=e.generation,
            payload=_struct(e.payload),
            timestamp_ms=e.timestamp_ms,
            state=pb.Task.State.Name(e.state),
        )


@dataclass
class OutputChunk:
    """A piece of a task's output (WatchTaskOutput)."""

    task_id: str
    offset: int
    stream: str
    data: str

    @property
    def end(self) -> int:
        """The offset just past this chunk."""
        return self.offset + len(self.data.encode("utf-8"))

    @classmethod
    def from_pb(cls, c: pb.TaskOutputChunk) -> "OutputChunk":
        return cls(task_id=c.task_id, offset=c.offset, stream=c.stream, data=c.data)


def push_request(fields: Dict[str, Any]) -> pb.PushTaskRequest:
    """A PushTaskRequest from keyword arguments named like its fields.

    ``metadata`` is a dict; ``priority`` a name ("HIGH") or number.
    """
    fields = dict(fields)
    if "metadata" in fields:
        fields["metadata"] = to_struct(fields["metadata"])
    prio = fields.get("priority")
    if isinstance(prio, str):
        fields["priority"] = pb.Priority.Value(prio.upper())
    return pb.PushTaskRequest(**{k: v for k, v in fields.items() if v is not None})


def trace_metadata(traceparent: Optional[str]) -> List[Tuple[str, str]]:
    """gRPC metadata carrying a W3C trace context: ``traceparent`` if given,
    else the current OpenTelemetry context when ``opentelemetry`` is
    installed (``traceparent`` and ``tracestate``), else nothing."""
    if traceparent is not None:
        return [("traceparent", traceparent)]
    try:
        from opentelemetry.propagate import inject
    except ImportError:
        return []
    carrier: Dict[str, str] = {}
    inject(carrier)
    return [(k, v) for k, v in carrier.items() if k in ("traceparent", "tracestate")]
