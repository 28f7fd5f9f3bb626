"""Print every event seq from ``watch(after_seq=0)`` as it arrives (one per
line), until ``--until`` seq; used by the hub's tests to check that the
iterator resumes by itself, without gaps, across a hub restart."""

import argparse
import sys

import agenthub
import agenthub.aio

ap = argparse.ArgumentParser()
ap.add_argument("--until", type=int, required=True)
ap.add_argument("--aio", action="store_true")
args = ap.parse_args()


def show(seq):
    print(seq, flush=True)
    return seq >= args.until


if args.aio:
    import asyncio

    async def main():
        hub = agenthub.aio.Hub(max_retry_interval=0.2)
        async for ev in hub.watch(after_seq=0):
            if show(ev.seq):
                return

    asyncio.run(main())
else:
    for ev in agenthub.Hub(max_retry_interval=0.2).watch(after_seq=0):
        if show(ev.seq):
            break
sys.exit(0)
