"""Follow task events: from now on, and replayed from a cursor."""

import threading
import uuid

import agenthub

hub = agenthub.Hub()
seen = []


def follow(task_id_box, after_seq):
    for ev in hub.watch(after_seq=after_seq):  # resumes by itself
        seen.append(ev)
        if ev.task_id == task_id_box[0] and ev.kind == "COMPLETED":
            return


# Start following before pushing, then push: every event of the task arrives.
box = [f"watched-{uuid.uuid4().hex[:8]}"]
first = hub.push(description="echo warm-up")
hub.wait(first, timeout=60)
now, _log_id = hub.head()  # the last event seq: "from now on"
t = threading.Thread(target=follow, args=(box, now), daemon=True)
t.start()
hub.push(description="echo watched", task_id=box[0])
t.join(timeout=60)
kinds = [e.kind for e in seen if e.task_id == box[0]]
assert kinds[0] == "CREATED" and kinds[-1] == "COMPLETED", kinds
print("live:", kinds)

# Replay: everything after a cursor, in order, without gaps.
cursor = seen[0].seq - 1
replayed = []
for ev in hub.watch(after_seq=cursor):
    replayed.append(ev)
    if ev.seq == seen[-1].seq:
        break
assert [e.seq for e in replayed] == list(range(cursor + 1, seen[-1].seq + 1))
print("replayed", len(replayed), "events")
