//! The web dashboard (SPEC §11): `GET /` serves a page embedded in the
//! binary, and the same `agenthub.v1.TaskHub` service is served as gRPC-Web
//! under `/agenthub.v1.TaskHub/<Method>` on the HTTP listener, so one origin
//! serves both page and API. The page sends those calls through one
//! WebSocket ([`tunnel`]) so that open streams never exhaust the browser's
//! six connections per origin.
//!
//! The page is built from `web/` at the repository root (`npm ci && npm run
//! build`) into `src/web/assets/`, which is committed: building the crate
//! never needs Node.js. `assets/BUILD_HASH` names the sources the bundle was
//! built from; a test fails when they changed without a rebuild.

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tower::Layer;

use crate::grpc::{auth_interceptor, TaskHubServer, TaskHubService};
use crate::hub::Hub;

pub mod tunnel;

/// The page shell.
pub const INDEX_HTML: &str = include_str!("assets/index.html");
/// The bundled application (esbuild output).
pub const APP_JS: &str = include_str!("assets/app.js");
/// The stylesheet.
pub const APP_CSS: &str = include_str!("assets/app.css");
/// SHA-256 over the sources the bundle was built from (see `web/build.mjs`).
pub const BUILD_HASH: &str = include_str!("assets/BUILD_HASH");

/// The gRPC path prefix the dashboard (and any gRPC-Web client) calls.
pub const GRPC_WEB_PATH: &str = "/agenthub.v1.TaskHub/{*method}";

/// Only what the page itself loads, and calls to its own origin.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// Routes for the dashboard page and its assets, and gRPC-Web for
/// `agenthub.v1.TaskHub` with the same auth interceptor as the gRPC listener.
/// Watch streams end when `shutdown` turns true.
pub fn router(hub: Arc<Hub>, shutdown: watch::Receiver<bool>) -> Router {
    let max_message = hub.config().max_message_bytes;
    let grpc_web = tonic_web::GrpcWebLayer::new().layer(crate::cluster::tunnel::Forward::new(
        TaskHubServer::with_interceptor(
            TaskHubService::new(hub.clone(), shutdown.clone()),
            auth_interceptor(hub.clone()),
        ),
        &hub,
    ));
    let calls = Router::new().route_service(GRPC_WEB_PATH, grpc_web);
    let tunneled = calls.clone();
    Router::new()
        .route("/", get(index))
        .route("/assets/app.js", get(app_js))
        .route("/assets/app.css", get(app_css))
        .route(
            tunnel::PATH,
            get(move |ws: WebSocketUpgrade, headers: HeaderMap| async move {
                // Room for the largest request plus the call's own header.
                tunnel::upgrade(
                    ws,
                    &headers,
                    tunneled,
                    max_message + 64 * 1024,
                    shutdown.clone(),
                )
            }),
        )
        .merge(calls)
}

async fn index(request: HeaderMap) -> Response {
    asset(&request, INDEX_HTML, "text/html; charset=utf-8")
}

async fn app_js(request: HeaderMap) -> Response {
    asset(&request, APP_JS, "text/javascript; charset=utf-8")
}

async fn app_css(request: HeaderMap) -> Response {
    asset(&request, APP_CSS, "text/css; charset=utf-8")
}

/// An embedded file, revalidated by its build hash (`ETag`; `304` when it
/// matches) so a new binary's page is never mixed with an old cached script.
fn asset(request: &HeaderMap, body: &'static str, content_type: &'static str) -> Response {
    let etag = HeaderValue::from_str(&format!("\"{}\"", BUILD_HASH.trim()))
        .unwrap_or(HeaderValue::from_static("\"dev\""));
    if request.get(header::IF_NONE_MATCH) == Some(&etag) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::ETAG, etag),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        body,
    )
        .into_response()
}
