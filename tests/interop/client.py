"""A gRPC client built only from proto/agenthub/v1/hub.proto (stubs generated
by grpcio-tools at test time): it shares no code with the hub.

Pushes one task pinned to --agent (twice, to check the idempotent retry),
follows its events with WatchTaskEvents(after_seq=0, task_id=...) until
COMPLETED, reads it back with GetTask, and prints one JSON summary line.
"""

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpc", required=True, help="host:port of the hub's gRPC listener")
    ap.add_argument("--token", required=True, help="orchestrator or admin token")
    ap.add_argument("--agent", required=True)
    ap.add_argument("--stubs", required=True, help="directory holding agenthub/v1/hub_pb2*.py")
    ap.add_argument("--task-id", default="interop-task-1")
    ap.add_argument("--ca-file", help="CA certificate (PEM): connect over TLS")
    args = ap.parse_args()

    sys.path.insert(0, args.stubs)
    import grpc
    from google.protobuf import json_format, struct_pb2
    from agenthub.v1 import hub_pb2 as pb
    from agenthub.v1 import hub_pb2_grpc as pb_grpc

    auth = [("authorization", f"Bearer {args.token}")]
    if args.ca_file:
        with open(args.ca_file, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        channel = grpc.secure_channel(args.grpc, creds)
    else:
        channel = grpc.insecure_channel(args.grpc)
    with channel:
        hub = pb_grpc.TaskHubStub(channel)

        metadata = struct_pb2.Struct()
        metadata.update({"lang": "python", "n": 7, "nested": {"ok": True}})
        req = pb.PushTaskRequest(
            agent_id=args.agent,
            description="interop: hello from python",
            metadata=metadata,
            task_id=args.task_id,
            priority=pb.HIGH,
        )
        first = hub.PushTask(req, metadata=auth, timeout=10)
        again = hub.PushTask(req, metadata=auth, timeout=10)

        # Missing token: the hub must answer UNAUTHENTICATED.
        try:
            hub.GetTask(pb.GetTaskRequest(task_id=args.task_id), timeout=10)
            unauthenticated = False
        except grpc.RpcError as e:
            unauthenticated = e.code() == grpc.StatusCode.UNAUTHENTICATED

        events = []
        stream = hub.WatchTaskEvents(
            pb.WatchTaskEventsRequest(after_seq=0, task_id=args.task_id),
            metadata=auth,
            timeout=30,
        )
        for ev in stream:
            events.append(ev)
            if ev.kind in (pb.TaskEvent.COMPLETED, pb.TaskEvent.FAILED):
                break
        stream.cancel()

        task = hub.GetTask(pb.GetTaskRequest(task_id=args.task_id), metadata=auth, timeout=10)

    summary = {
        "task_id": first.task_id,
        "created": first.created,
        "retry_created": again.created,
        "retry_task_id": again.task_id,
        "unauthenticated_without_token": unauthenticated,
        "kinds": [pb.TaskEvent.Kind.Name(e.kind) for e in events],
        "seqs": [e.seq for e in events],
        "agents": [e.agent_id for e in events],
        "progress": [
            json_format.MessageToDict(e.payload).get("progress")
            for e in events
            if e.kind == pb.TaskEvent.PROGRESS
        ],
        "state": pb.Task.State.Name(task.state),
        "generation": task.generation,
        "result": json_format.MessageToDict(task.result),
        "metadata": json_format.MessageToDict(task.metadata),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
