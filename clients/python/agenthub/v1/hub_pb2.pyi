from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    LOW: _ClassVar[Priority]
    NORMAL: _ClassVar[Priority]
    HIGH: _ClassVar[Priority]
    URGENT: _ClassVar[Priority]
PRIORITY_UNSPECIFIED: Priority
LOW: Priority
NORMAL: Priority
HIGH: Priority
URGENT: Priority

class PushTaskRequest(_message.Message):
    __slots__ = ("agent_id", "description", "metadata", "task_id", "needed_capabilities", "priority", "queue_if_offline", "max_attempts", "depends_on", "queue_ttl_ms", "deadline_ms")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NEEDED_CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    QUEUE_IF_OFFLINE_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    description: str
    metadata: _struct_pb2.Struct
    task_id: str
    needed_capabilities: _containers.RepeatedScalarFieldContainer[str]
    priority: Priority
    queue_if_offline: bool
    max_attempts: int
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    queue_ttl_ms: int
    deadline_ms: int
    def __init__(self, agent_id: _Optional[str] = ..., description: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., task_id: _Optional[str] = ..., needed_capabilities: _Optional[_Iterable[str]] = ..., priority: _Optional[_Union[Priority, str]] = ..., queue_if_offline: _Optional[bool] = ..., max_attempts: _Optional[int] = ..., depends_on: _Optional[_Iterable[str]] = ..., queue_ttl_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class PushTaskResponse(_message.Message):
    __slots__ = ("task_id", "agent_id", "state", "created")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    agent_id: str
    state: Task.State
    created: bool
    def __init__(self, task_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., state: _Optional[_Union[Task.State, str]] = ..., created: _Optional[bool] = ...) -> None: ...

class WatchTaskEventsRequest(_message.Message):
    __slots__ = ("after_seq", "task_id", "agent_id", "kinds", "log_id")
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    after_seq: int
    task_id: str
    agent_id: str
    kinds: _containers.RepeatedScalarFieldContainer[TaskEvent.Kind]
    log_id: str
    def __init__(self, after_seq: _Optional[int] = ..., task_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., kinds: _Optional[_Iterable[_Union[TaskEvent.Kind, str]]] = ..., log_id: _Optional[str] = ...) -> None: ...

class TaskEvent(_message.Message):
    __slots__ = ("seq", "task_id", "agent_id", "kind", "generation", "payload", "timestamp_ms", "state")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[TaskEvent.Kind]
        CREATED: _ClassVar[TaskEvent.Kind]
        ASSIGNED: _ClassVar[TaskEvent.Kind]
        ACCEPTED: _ClassVar[TaskEvent.Kind]
        PROGRESS: _ClassVar[TaskEvent.Kind]
        COMPLETED: _ClassVar[TaskEvent.Kind]
        FAILED: _ClassVar[TaskEvent.Kind]
        REJECTED: _ClassVar[TaskEvent.Kind]
        RECOVERING: _ClassVar[TaskEvent.Kind]
        CONTINUED: _ClassVar[TaskEvent.Kind]
        RECLAIMED: _ClassVar[TaskEvent.Kind]
        CANCELLED: _ClassVar[TaskEvent.Kind]
        RETRIED: _ClassVar[TaskEvent.Kind]
    KIND_UNSPECIFIED: TaskEvent.Kind
    CREATED: TaskEvent.Kind
    ASSIGNED: TaskEvent.Kind
    ACCEPTED: TaskEvent.Kind
    PROGRESS: TaskEvent.Kind
    COMPLETED: TaskEvent.Kind
    FAILED: TaskEvent.Kind
    REJECTED: TaskEvent.Kind
    RECOVERING: TaskEvent.Kind
    CONTINUED: TaskEvent.Kind
    RECLAIMED: TaskEvent.Kind
    CANCELLED: TaskEvent.Kind
    RETRIED: TaskEvent.Kind
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    task_id: str
    agent_id: str
    kind: TaskEvent.Kind
    generation: int
    payload: _struct_pb2.Struct
    timestamp_ms: int
    state: Task.State
    def __init__(self, seq: _Optional[int] = ..., task_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., kind: _Optional[_Union[TaskEvent.Kind, str]] = ..., generation: _Optional[int] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., timestamp_ms: _Optional[int] = ..., state: _Optional[_Union[Task.State, str]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "agent_id", "description", "metadata", "state", "generation", "attempts", "max_attempts", "needed_capabilities", "priority", "result", "error", "created_at_ms", "updated_at_ms", "last_seq", "pinned", "depends_on", "queue_ttl_ms", "deadline_ms")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Task.State]
        QUEUED: _ClassVar[Task.State]
        ASSIGNED: _ClassVar[Task.State]
        RUNNING: _ClassVar[Task.State]
        COMPLETED: _ClassVar[Task.State]
        FAILED: _ClassVar[Task.State]
        CANCELLED: _ClassVar[Task.State]
    STATE_UNSPECIFIED: Task.State
    QUEUED: Task.State
    ASSIGNED: Task.State
    RUNNING: Task.State
    COMPLETED: Task.State
    FAILED: Task.State
    CANCELLED: Task.State
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    NEEDED_CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    QUEUE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    agent_id: str
    description: str
    metadata: _struct_pb2.Struct
    state: Task.State
    generation: int
    attempts: int
    max_attempts: int
    needed_capabilities: _containers.RepeatedScalarFieldContainer[str]
    priority: Priority
    result: _struct_pb2.Value
    error: _struct_pb2.Value
    created_at_ms: int
    updated_at_ms: int
    last_seq: int
    pinned: bool
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    queue_ttl_ms: int
    deadline_ms: int
    def __init__(self, task_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., description: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., state: _Optional[_Union[Task.State, str]] = ..., generation: _Optional[int] = ..., attempts: _Optional[int] = ..., max_attempts: _Optional[int] = ..., needed_capabilities: _Optional[_Iterable[str]] = ..., priority: _Optional[_Union[Priority, str]] = ..., result: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., error: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., last_seq: _Optional[int] = ..., pinned: _Optional[bool] = ..., depends_on: _Optional[_Iterable[str]] = ..., queue_ttl_ms: _Optional[int] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("state", "agent_id", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: Task.State
    agent_id: str
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[Task.State, str]] = ..., agent_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token", "as_of_seq", "log_id")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AS_OF_SEQ_FIELD_NUMBER: _ClassVar[int]
    LOG_ID_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    next_page_token: str
    as_of_seq: int
    log_id: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., as_of_seq: _Optional[int] = ..., log_id: _Optional[str] = ...) -> None: ...

class CancelTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class RetryTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class RestartAgentRequest(_message.Message):
    __slots__ = ("agent_id", "reason")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    reason: str
    def __init__(self, agent_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RestartAgentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentResources(_message.Message):
    __slots__ = ("cpu_percent", "ram_used_bytes", "ram_total_bytes", "vram_used_bytes", "vram_total_bytes", "reported_at_ms")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    RAM_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RAM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    VRAM_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    VRAM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPORTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    ram_used_bytes: int
    ram_total_bytes: int
    vram_used_bytes: int
    vram_total_bytes: int
    reported_at_ms: int
    def __init__(self, cpu_percent: _Optional[float] = ..., ram_used_bytes: _Optional[int] = ..., ram_total_bytes: _Optional[int] = ..., vram_used_bytes: _Optional[int] = ..., vram_total_bytes: _Optional[int] = ..., reported_at_ms: _Optional[int] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Agent(_message.Message):
    __slots__ = ("agent_id", "name", "capabilities", "status", "connected", "connected_at", "active_task_ids", "resources", "max_concurrency", "presence", "away_since_ms")
    class Presence(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PRESENCE_UNSPECIFIED: _ClassVar[Agent.Presence]
        CONNECTED: _ClassVar[Agent.Presence]
        AWAY: _ClassVar[Agent.Presence]
        GONE: _ClassVar[Agent.Presence]
    PRESENCE_UNSPECIFIED: Agent.Presence
    CONNECTED: Agent.Presence
    AWAY: Agent.Presence
    GONE: Agent.Presence
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_TASK_IDS_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    AWAY_SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    name: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    status: str
    connected: bool
    connected_at: int
    active_task_ids: _containers.RepeatedScalarFieldContainer[str]
    resources: AgentResources
    max_concurrency: int
    presence: Agent.Presence
    away_since_ms: int
    def __init__(self, agent_id: _Optional[str] = ..., name: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ..., status: _Optional[str] = ..., connected: _Optional[bool] = ..., connected_at: _Optional[int] = ..., active_task_ids: _Optional[_Iterable[str]] = ..., resources: _Optional[_Union[AgentResources, _Mapping]] = ..., max_concurrency: _Optional[int] = ..., presence: _Optional[_Union[Agent.Presence, str]] = ..., away_since_ms: _Optional[int] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[Agent]
    def __init__(self, agents: _Optional[_Iterable[_Union[Agent, _Mapping]]] = ...) -> None: ...

class WaitTaskRequest(_message.Message):
    __slots__ = ("task_id", "timeout_ms")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    timeout_ms: int
    def __init__(self, task_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class WatchTaskOutputRequest(_message.Message):
    __slots__ = ("task_id", "after_offset", "stored_only")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    STORED_ONLY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    after_offset: int
    stored_only: bool
    def __init__(self, task_id: _Optional[str] = ..., after_offset: _Optional[int] = ..., stored_only: _Optional[bool] = ...) -> None: ...

class TaskOutputChunk(_message.Message):
    __slots__ = ("task_id", "offset", "stream", "data", "generation")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    offset: int
    stream: str
    data: str
    generation: int
    def __init__(self, task_id: _Optional[str] = ..., offset: _Optional[int] = ..., stream: _Optional[str] = ..., data: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class IssueTokenRequest(_message.Message):
    __slots__ = ("role", "agent_id")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    role: str
    agent_id: str
    def __init__(self, role: _Optional[str] = ..., agent_id: _Optional[str] = ...) -> None: ...

class IssueTokenResponse(_message.Message):
    __slots__ = ("id", "token")
    ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    id: str
    token: str
    def __init__(self, id: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("id", "role", "agent_id", "created_at_ms", "revoked")
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    id: str
    role: str
    agent_id: str
    created_at_ms: int
    revoked: bool
    def __init__(self, id: _Optional[str] = ..., role: _Optional[str] = ..., agent_id: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., revoked: _Optional[bool] = ...) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeTokenResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
