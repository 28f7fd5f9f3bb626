"""Dependencies, queue TTL and deadlines.

A three-step chain runs in order; a chain whose first step fails fails the
rest (``dependency_failed``); a task nobody takes fails at its queue TTL; a
task that runs too long is stopped at its deadline.
"""

import time

import agenthub

hub = agenthub.Hub()

# Three steps: each starts when the one before it has COMPLETED.
s1 = hub.push(description="sleep 0.2; echo one")
s2 = hub.push(description="echo two", depends_on=[s1])
s3 = hub.push(description="echo three", depends_on=[s2])
done = [hub.wait(t, timeout=60) for t in (s1, s2, s3)]
assert [t.state for t in done] == ["COMPLETED"] * 3, done


def first_seq(task_id, kind):
    for ev in hub.watch(after_seq=0, task_id=task_id, kinds=[kind]):
        return ev.seq


# Each step was assigned only after the step before it COMPLETED.
assert first_seq(s2, "ASSIGNED") > done[0].last_seq
assert first_seq(s3, "ASSIGNED") > done[1].last_seq
print("chain:", [t.result["stdout"].strip() for t in done])

# The first step fails: the rest fail too, naming their direct dependency.
f1 = hub.push(description="exit 3", max_attempts=1)
f2 = hub.push(description="echo never", depends_on=[f1])
f3 = hub.push(description="echo never", depends_on=[f2])
t3 = hub.wait(f3, timeout=60)
assert t3.state == "FAILED", t3
assert t3.error == {"reason": "dependency_failed", "dependency": f2}, t3.error
print("failed chain:", hub.get(f2).error)

# Nobody takes it within its queue TTL.
ttl = hub.push(description="echo late", agent_id="nobody", queue_if_offline=True, queue_ttl_ms=300)
t = hub.wait(ttl, timeout=30)
assert (t.state, t.error) == ("FAILED", {"reason": "ttl_expired"}), t
print("queue ttl:", t.error)

# Runs past its deadline: cancelled at its sidecar, FAILED.
slow = hub.push(description="sleep 30", deadline_ms=int(time.time() * 1000) + 500)
t = hub.wait(slow, timeout=30)
assert (t.state, t.error) == ("FAILED", {"reason": "deadline_exceeded"}), t
print("deadline:", t.error)

# A wait that times out returns the task as it is.
pending = hub.push(description="echo x", agent_id="nobody", queue_if_offline=True)
t = hub.wait(pending, timeout=0.2)
assert not t.finished and t.state == "QUEUED", t
hub.cancel(pending)
