// The hub's own gRPC API over gRPC-Web, on the page's origin (SPEC §11).
// Every call carries `authorization: Bearer <token>`; nothing private.

import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { toJson } from "@bufbuild/protobuf";
import { ValueSchema, type Value } from "@bufbuild/protobuf/wkt";
import { TaskHub } from "./gen/agenthub/v1/hub_pb";
import { socketFetch } from "./socket";

export type Hub = Client<typeof TaskHub>;

/** Where the token lives: this tab only, never the URL. */
const TOKEN_KEY = "agenthub.token";

export function savedToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function saveToken(token: string): void {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function forgetToken(): void {
  sessionStorage.removeItem(TOKEN_KEY);
}

export function hubClient(token: string): Hub {
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const transport = createGrpcWebTransport({
    baseUrl: location.origin,
    interceptors: [auth],
    // Every call through the page's one WebSocket (./socket.ts).
    fetch: socketFetch,
  });
  return createClient(TaskHub, transport);
}

/** What a token may do. The API has no "who am I": see `probeRole`. */
export type Role = "viewer" | "writer";

/**
 * Tell a read-only token from one that may push, cancel and retry, with a
 * call that changes nothing: CancelTask of the empty id. A viewer token gets
 * PERMISSION_DENIED (roles are checked first); an orchestrator or admin token
 * gets NOT_FOUND. Any other failure is reported as is.
 */
export async function probeRole(hub: Hub): Promise<Role> {
  try {
    await hub.cancelTask({ taskId: "" });
    return "writer";
  } catch (e) {
    const err = ConnectError.from(e);
    if (err.code === Code.PermissionDenied) return "viewer";
    if (err.code === Code.NotFound || err.code === Code.InvalidArgument) return "writer";
    throw err;
  }
}

/** Kinds of failure the page explains differently. */
export type Failure = "token" | "forbidden" | "unreachable" | "other";

export function classify(e: unknown): Failure {
  const err = ConnectError.from(e);
  switch (err.code) {
    case Code.Unauthenticated:
      return "token";
    case Code.PermissionDenied:
      return "forbidden";
    case Code.Unavailable:
    case Code.Unknown:
    case Code.Canceled:
    case Code.DeadlineExceeded:
    case Code.Internal:
      return "unreachable";
    default:
      return "other";
  }
}

/** A sentence for a person. */
export function explain(e: unknown): string {
  const err = ConnectError.from(e);
  switch (classify(err)) {
    case "token":
      return "The hub did not accept this token: it is wrong, expired or revoked.";
    case "forbidden":
      return `This token may not do that (${err.rawMessage}).`;
    case "unreachable":
      return "The hub is unreachable.";
    default:
      return `${Code[err.code] ?? "error"}: ${err.rawMessage}`;
  }
}

export function isCode(e: unknown, code: Code): boolean {
  return ConnectError.from(e).code === code;
}

/** A protobuf Value (result, error) as JSON text. */
export function valueText(v: Value | undefined): string {
  if (!v || v.kind.case === undefined) return "";
  const json = toJson(ValueSchema, v);
  return typeof json === "string" ? json : JSON.stringify(json, null, 1);
}

export { Code };
