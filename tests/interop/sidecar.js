// A minimal sidecar written with the npm `ws` package: it shares no code
// with the hub, only the JSON protocol (protocol_version 1).
//
// env: AGENTHUB_WS_URL, AGENTHUB_AGENT_ID, AGENTHUB_TOKEN.
// Prints "identified" once the hub accepted it, then runs exactly one task:
// accept, two progress reports, complete; prints {"done": task_id} and exits 0
// once the hub acked the completion. Any protocol surprise exits 1.
'use strict';

const WebSocket = require('ws');

const url = process.env.AGENTHUB_WS_URL;
const agentId = process.env.AGENTHUB_AGENT_ID;
const token = process.env.AGENTHUB_TOKEN;
if (!url || !agentId || !token) {
  console.error('need AGENTHUB_WS_URL, AGENTHUB_AGENT_ID and AGENTHUB_TOKEN');
  process.exit(2);
}

const fail = (why) => {
  console.error(`node sidecar: ${why}`);
  process.exit(1);
};
setTimeout(() => fail('timed out'), 30000).unref();

const ws = new WebSocket(url);
const send = (msg) => ws.send(JSON.stringify(msg));
let task = null;
let gotPong = false;

ws.on('open', () => {
  send({
    type: 'identify',
    agent_id: agentId,
    token,
    protocol_version: 1,
    client_type: 'sidecar',
    name: 'node interop sidecar',
    capabilities: ['node'],
    max_concurrency: 1,
  });
});

ws.on('message', (data) => {
  let msg;
  try {
    msg = JSON.parse(data.toString());
  } catch (e) {
    fail(`hub sent invalid JSON: ${data}`);
  }
  switch (msg.type) {
    case 'identified':
      if (msg.agent_id !== agentId) fail(`identified as ${msg.agent_id}`);
      send({ type: 'ping' });
      break;
    case 'pong':
      if (typeof msg.timestamp !== 'number') fail(`pong without timestamp: ${JSON.stringify(msg)}`);
      if (!gotPong) {
        gotPong = true;
        console.log('identified');
      }
      break;
    case 'task_assign':
      if (task) fail(`second task_assign: ${JSON.stringify(msg)}`);
      for (const f of ['task_id', 'description', 'metadata', 'generation', 'assigned_at']) {
        if (!(f in msg)) fail(`task_assign without ${f}: ${JSON.stringify(msg)}`);
      }
      task = msg;
      send({ type: 'task_accepted', task_id: task.task_id, generation: task.generation, protocol_version: 1 });
      break;
    case 'task_ack':
      if (!task || msg.task_id !== task.task_id) fail(`ack for an unknown task: ${JSON.stringify(msg)}`);
      if (msg.status === 'accepted') {
        send({ type: 'task_progress', task_id: task.task_id, generation: task.generation, progress: 50 });
        send({
          type: 'task_progress',
          task_id: task.task_id,
          generation: task.generation,
          progress: { stage: 'almost', percent: 90 },
        });
        send({
          type: 'task_complete',
          task_id: task.task_id,
          generation: task.generation,
          result: {
            echoed: task.description,
            metadata: task.metadata,
            runtime: `node ${process.version}`,
          },
        });
      } else if (msg.status === 'complete') {
        console.log(JSON.stringify({ done: task.task_id }));
        ws.close(1000);
      } else {
        fail(`unexpected ack: ${JSON.stringify(msg)}`);
      }
      break;
    case 'error':
      fail(`hub error: ${JSON.stringify(msg)}`);
      break;
    default:
      fail(`unexpected message: ${JSON.stringify(msg)}`);
  }
});

ws.on('close', () => {
  if (!task) fail('connection closed before a task arrived');
  process.exit(0);
});
ws.on('error', (e) => fail(`websocket error: ${e.message}`));
