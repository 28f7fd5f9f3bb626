// gRPC-Web calls over one WebSocket per page (the hub's
// /agenthub.v1.TaskHub.socket, src/web/tunnel.rs), handed to the gRPC-Web
// transport as its `fetch`: every call, stream or not, is a tagged exchange
// on the one socket. A browser gives an origin six HTTP/1.1 connections,
// shared by all tabs, and a gRPC-Web stream over fetch holds one for as long
// as it is open; WebSockets are not counted against that limit, so any
// number of tabs each keep their live streams and still make calls.

const PATH = "/agenthub.v1.TaskHub.socket";
const CALL = 0;
const CANCEL = 1;
const HEAD = 0;
const DATA = 1;
const END = 2;
const FAIL = 3;

interface Pending {
  resolve: (r: Response) => void;
  reject: (e: unknown) => void;
  body?: ReadableStreamDefaultController<Uint8Array>;
  done: () => void;
}

class Tunnel {
  private ws: WebSocket | undefined;
  private opened: Promise<WebSocket> | undefined;
  private calls = new Map<number, Pending>();
  private nextId = 1;

  private socket(): Promise<WebSocket> {
    if (this.opened) return this.opened;
    const url = new URL(PATH, location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    this.opened = new Promise((resolve, reject) => {
      ws.onopen = () => resolve(ws);
      ws.onerror = () => reject(new TypeError("the hub is unreachable"));
      ws.onclose = () => {
        reject(new TypeError("the hub is unreachable"));
        this.closed(ws);
      };
      ws.onmessage = (m) => this.receive(new Uint8Array(m.data as ArrayBuffer));
    });
    return this.opened;
  }

  /** The socket went away: every call on it fails as a broken fetch would. */
  private closed(ws: WebSocket): void {
    if (this.ws !== ws) return;
    this.ws = undefined;
    this.opened = undefined;
    const calls = [...this.calls.values()];
    this.calls.clear();
    for (const c of calls) fail(c, new TypeError("connection to the hub lost"));
  }

  private receive(b: Uint8Array): void {
    if (b.length < 5) return;
    const id = new DataView(b.buffer, b.byteOffset).getUint32(1);
    const c = this.calls.get(id);
    if (!c) return;
    const rest = b.subarray(5);
    switch (b[0]) {
      case HEAD: {
        const head = JSON.parse(new TextDecoder().decode(rest)) as { status: number; headers: Record<string, string> };
        const body = new ReadableStream<Uint8Array>({
          start: (controller) => {
            c.body = controller;
          },
          cancel: () => this.cancel(id),
        });
        c.resolve(new Response(body, { status: head.status, headers: head.headers }));
        break;
      }
      case DATA:
        c.body?.enqueue(rest.slice());
        break;
      case END:
        this.calls.delete(id);
        c.done();
        c.body?.close();
        break;
      case FAIL:
        this.calls.delete(id);
        fail(c, new TypeError(new TextDecoder().decode(rest)));
        break;
    }
  }

  private cancel(id: number): void {
    const c = this.calls.get(id);
    if (!c) return;
    this.calls.delete(id);
    c.done();
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(frame(CANCEL, id, new Uint8Array()));
  }

  readonly fetch = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    const signal = init?.signal ?? undefined;
    signal?.throwIfAborted();
    const url = new URL(typeof input === "string" || input instanceof URL ? input : input.url, location.href);
    const headers: Record<string, string> = {};
    new Headers(init?.headers).forEach((v, k) => (headers[k] = v));
    const body = init?.body instanceof Uint8Array ? init.body : new Uint8Array(await new Response(init?.body ?? null).arrayBuffer());
    const ws = await this.socket();
    signal?.throwIfAborted();
    const id = this.nextId++;
    return new Promise<Response>((resolve, reject) => {
      const onAbort = () => {
        const c = this.calls.get(id);
        this.cancel(id);
        if (c) fail(c, signal?.reason ?? new DOMException("aborted", "AbortError"));
      };
      const c: Pending = { resolve, reject, done: () => signal?.removeEventListener("abort", onAbort) };
      this.calls.set(id, c);
      signal?.addEventListener("abort", onAbort);
      const head = new TextEncoder().encode(JSON.stringify({ path: url.pathname, headers }));
      const rest = new Uint8Array(4 + head.length + body.length);
      new DataView(rest.buffer).setUint32(0, head.length);
      rest.set(head, 4);
      rest.set(body, 4 + head.length);
      ws.send(frame(CALL, id, rest));
    });
  };
}

function fail(c: Pending, e: unknown): void {
  c.done();
  c.reject(e);
  try {
    c.body?.error(e);
  } catch {
    // Already closed.
  }
}

function frame(kind: number, id: number, rest: Uint8Array): Uint8Array {
  const b = new Uint8Array(5 + rest.length);
  b[0] = kind;
  new DataView(b.buffer).setUint32(1, id);
  b.set(rest, 5);
  return b;
}

/** The page's one socket, as a `fetch` for the gRPC-Web transport. */
export const socketFetch: typeof globalThis.fetch = new Tunnel().fetch;
