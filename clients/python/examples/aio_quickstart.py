"""The asyncio client: push, output, wait and watch as coroutines."""

import asyncio

import agenthub.aio


async def main() -> int:
    async with agenthub.aio.Hub() as hub:
        task_id = await hub.push(description="echo hello from asyncio; echo oops >&2")
        out = [c async for c in hub.output(task_id)]
        task = await hub.wait(task_id, timeout=60)
        assert task.state == "COMPLETED", task
        assert "".join(c.data for c in out if c.stream == "stdout") == "hello from asyncio\n", out
        assert [c.data for c in out if c.stream == "stderr"] == ["oops\n"], out
        kinds = []
        async for ev in hub.watch(after_seq=task.last_seq - 1, task_id=task_id):
            kinds.append(ev.kind)
            break
        assert kinds == ["COMPLETED"], kinds
        print(task.state, task.result["stdout"].strip())
        return 0


raise SystemExit(asyncio.run(main()))
