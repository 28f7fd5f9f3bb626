"""Push two tasks through the Python client (agenthub package) and wait for
both: one with an explicit ``traceparent=``, one inside a current
OpenTelemetry span context (API only). Prints {"explicit": id, "current": id}."""

import argparse
import json

from opentelemetry import context, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

import agenthub

p = argparse.ArgumentParser()
p.add_argument("--grpc", required=True)
p.add_argument("--token", required=True)
p.add_argument("--agent", required=True)
p.add_argument("--traceparent", required=True, help="for the explicit push")
p.add_argument("--current", required=True, help="traceparent made the current context")
args = p.parse_args()

hub = agenthub.Hub(args.grpc, args.token)
explicit = hub.push(description="explicit", agent_id=args.agent, traceparent=args.traceparent)

_, trace_id, span_id, flags = args.current.split("-")
parent = SpanContext(
    trace_id=int(trace_id, 16),
    span_id=int(span_id, 16),
    is_remote=False,
    trace_flags=TraceFlags(int(flags, 16)),
)
token = context.attach(trace.set_span_in_context(NonRecordingSpan(parent)))
try:
    current = hub.push(description="current", agent_id=args.agent)
finally:
    context.detach(token)

for t in (explicit, current):
    task = hub.wait(t, timeout=30)
    assert task.state == "COMPLETED", task
print(json.dumps({"explicit": explicit, "current": current}), flush=True)
