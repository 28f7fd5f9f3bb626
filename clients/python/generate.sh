#!/usr/bin/env bash
# Regenerate the gRPC stubs in agenthub/v1 from proto/agenthub/v1/hub.proto
# (needs grpcio-tools; scripts/test-deps.sh puts it in .venv). The stubs
# are committed, so `pip install ./clients/python` needs no code generator.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-../../.venv/bin/python}
"$python" -m grpc_tools.protoc -I ../../proto \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  ../../proto/agenthub/v1/hub.proto
