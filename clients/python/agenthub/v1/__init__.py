"""Generated gRPC stubs for agenthub.v1 (see ../../generate.sh)."""
