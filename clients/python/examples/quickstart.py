"""Push a shell task, print its output live, wait for the result.

Needs a hub (AGENTHUB_GRPC_ADDR, AGENTHUB_TOKEN) and a sidecar that runs
descriptions as shell commands, e.g.
``agenthub sidecar --agent w1 -- sh -c 'eval "$AGENTHUB_TASK_DESCRIPTION"'``.
"""

import agenthub

hub = agenthub.Hub()  # AGENTHUB_GRPC_ADDR / AGENTHUB_TOKEN
task_id = hub.push(description="echo hello from python", metadata={"team": "docs"})
for chunk in hub.output(task_id):  # live output, ends when the task does
    print(chunk.data, end="")
task = hub.wait(task_id, timeout=60)
print(task.state, task.result["stdout"].strip())
raise SystemExit(0 if task.state == "COMPLETED" else 1)
