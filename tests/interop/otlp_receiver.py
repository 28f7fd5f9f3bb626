"""A real OTLP/gRPC trace receiver for the trace test: serves
opentelemetry-proto's TraceService on 127.0.0.1 (a free port), prints
``port=N`` once listening, then one JSON line per received span:
trace_id, span_id, parent_span_id (hex), name and string attributes."""

import json
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for rs in request.resource_spans:
            service = ""
            for a in rs.resource.attributes:
                if a.key == "service.name":
                    service = a.value.string_value
            for ss in rs.scope_spans:
                for s in ss.spans:
                    attrs = {}
                    for a in s.attributes:
                        v = a.value
                        kind = v.WhichOneof("value")
                        attrs[a.key] = getattr(v, kind) if kind else None
                    line = {
                        "service": service,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "attributes": attrs,
                        "events": [e.name for e in s.events],
                    }
                    sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port={port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
