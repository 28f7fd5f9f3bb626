// Push: a form over PushTask, for orchestrator and admin tokens.

import { explain, type Hub } from "./api";
import { h, setText } from "./dom";
import { Priority } from "./gen/agenthub/v1/hub_pb";
import { stateName } from "./model";

export function pushForm(hub: Hub, openTask: (id: string) => void): HTMLElement {
  const description = h("textarea", { id: "push-description", name: "description", rows: 3, required: true, placeholder: "What should the agent do?" });
  const agent = h("input", { id: "push-agent", name: "agent", list: "agent-ids", placeholder: "empty: any capable agent" });
  const caps = h("input", { id: "push-caps", name: "caps", placeholder: "comma-separated, e.g. python, gpu" });
  const priority = h(
    "select",
    { id: "push-priority", name: "priority" },
    ...[Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.URGENT].map((p) => h("option", { value: String(p), selected: p === Priority.NORMAL }, Priority[p])),
  );
  const attempts = h("input", { id: "push-attempts", name: "attempts", type: "number", min: 0, value: 0 });
  const offline = h("input", { id: "push-offline", name: "offline", type: "checkbox" });
  const taskId = h("input", { id: "push-task-id", name: "task_id", placeholder: "optional idempotency key" });
  const metadata = h("textarea", { id: "push-metadata", name: "metadata", rows: 3, placeholder: '{"repo": "…"}' });
  const result = h("p", { id: "push-result", role: "status" });
  const submit = h("button", { type: "submit", id: "push-submit" }, "Push task");

  const form = h(
    "form",
    { class: "push", id: "push-form" },
    label("Description", description),
    label("Agent", agent),
    label("Needed capabilities", caps),
    label("Priority", priority),
    label("Max attempts (0 = hub default)", attempts),
    h("label", { class: "check" }, offline, " Queue if the pinned agent is offline"),
    label("Task id", taskId),
    label("Metadata (JSON object)", metadata),
    h("div", {}, submit),
    result,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    result.className = "";
    let meta: Record<string, unknown> | undefined;
    try {
      meta = metadata.value.trim() ? JSON.parse(metadata.value) : undefined;
      if (meta !== undefined && (typeof meta !== "object" || meta === null || Array.isArray(meta))) throw new Error("not an object");
    } catch {
      result.className = "error";
      setText(result, "Metadata must be a JSON object.");
      return;
    }
    submit.disabled = true;
    try {
      const r = await hub.pushTask({
        description: description.value,
        agentId: agent.value.trim(),
        neededCapabilities: caps.value.split(",").map((c) => c.trim()).filter(Boolean),
        priority: Number(priority.value) as Priority,
        maxAttempts: Number(attempts.value) || 0,
        queueIfOffline: offline.checked,
        taskId: taskId.value.trim(),
        metadata: meta as never,
      });
      result.replaceChildren(
        r.created ? "Pushed " : "Already existed: ",
        h("a", { href: "#", id: "push-result-task", class: "task-link", onclick: (ev: Event) => (ev.preventDefault(), openTask(r.taskId)) }, r.taskId),
        ` — ${stateName(r.state)}${r.agentId ? ` on ${r.agentId}` : ""}.`,
      );
    } catch (err) {
      result.className = "error";
      setText(result, explain(err));
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

function label(text: string, input: HTMLElement): HTMLElement {
  return h("label", {}, h("span", {}, text), input);
}
