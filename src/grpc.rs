//! The `agenthub.v1.TaskHub` gRPC service: decode, authorize, call the hub,
//! encode. No business rules here.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::{Access, Principal, Role};
use crate::error::Error;
use crate::grpc_limits::WatchSlots;
use crate::hub::{Hub, ListQuery, PushRequest};
use crate::model::EventFilter;
use crate::pb::server::task_hub_server::TaskHub;
use crate::pb::{self, wire::EventBytes};

pub use pb::server::task_hub_server::TaskHubServer;

/// Shortest gap between two lists on a `WatchAgents` stream.
const AGENTS_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(100);

/// Response header of `WatchTaskEvents` naming the log its seqs belong to.
pub const LOG_ID_HEADER: &str = "agenthub-log-id";

/// The service; authentication happens in [`auth_interceptor`].
pub struct TaskHubService {
    hub: Arc<Hub>,
    shutdown: watch::Receiver<bool>,
    /// Live watch streams per token (`--max-watches-per-token`).
    watch_slots: Arc<WatchSlots>,
}

impl TaskHubService {
    /// Watch streams end when `shutdown` turns true.
    pub fn new(hub: Arc<Hub>, shutdown: watch::Receiver<bool>) -> TaskHubService {
        let watch_slots = WatchSlots::new(
            hub.config().max_watches_per_token,
            hub.metrics().limits.clone(),
        );
        TaskHubService {
            hub,
            shutdown,
            watch_slots,
        }
    }
}

/// Verify `authorization: Bearer <token>` and attach the [`Principal`].
pub fn auth_interceptor(
    hub: Arc<Hub>,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        // Cluster mode: a call a follower forwarded, whose token that
        // follower verified (see `cluster::tunnel`).
        if let Some(crate::cluster::Forwarded(p)) = req.extensions().get().cloned() {
            req.extensions_mut().insert(p);
            return Ok(req);
        }
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let principal = hub.verifier().verify_bearer(header)?;
        req.extensions_mut().insert(principal);
        Ok(req)
    }
}

fn allow<T>(req: &Request<T>, access: Access) -> Result<(), Status> {
    let principal = req
        .extensions()
        .get::<Principal>()
        .ok_or(Error::Unauthenticated)?;
    Ok(principal.allow(access)?)
}

/// The id of the token a request authenticated with (for watch slots and revocation).
fn principal_token_id<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<Principal>()
        .map(|p| p.token_id.clone())
        .unwrap_or_default()
}

fn token_info(t: crate::auth::TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id,
        role: t.role.as_str().to_string(),
        agent_id: t.agent_id.unwrap_or_default(),
        created_at_ms: t.created_at_ms,
        revoked: t.revoked,
    }
}

/// Operations on agents themselves (`RestartAgent`) need an admin token.
fn allow_admin<T>(req: &Request<T>) -> Result<(), Status> {
    let principal = req
        .extensions()
        .get::<Principal>()
        .ok_or(Error::Unauthenticated)?;
    match principal.role {
        crate::auth::Role::Admin => Ok(()),
        _ => Err(Error::PermissionDenied("restarting an agent needs an admin token").into()),
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<EventBytes, Status>> + Send>>;
type OutputStream = Pin<Box<dyn Stream<Item = Result<pb::TaskOutputChunk, Status>> + Send>>;

#[tonic::async_trait]
impl TaskHub for TaskHubService {
    async fn push_task(
        &self,
        req: Request<pb::PushTaskRequest>,
    ) -> Result<Response<pb::PushTaskResponse>, Status> {
        allow(&req, Access::Write)?;
        // An invalid trace context is ignored, as W3C Trace Context says.
        let traceparent = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .filter(|v| crate::telemetry::valid_traceparent(v))
            .map(str::to_string);
        let r = req.into_inner();
        let priority = pb::Priority::try_from(r.priority)
            .map_err(|_| Error::InvalidArgument(format!("unknown priority {}", r.priority)))?;
        let push = PushRequest {
            agent_id: non_empty(r.agent_id),
            description: r.description,
            metadata: r
                .metadata
                .as_ref()
                .map(pb::struct_to_json)
                .unwrap_or_default(),
            task_id: non_empty(r.task_id),
            needed_capabilities: r.needed_capabilities,
            priority: priority.to_model(),
            queue_if_offline: r.queue_if_offline,
            max_attempts: r.max_attempts,
            depends_on: r.depends_on,
            queue_ttl_ms: r.queue_ttl_ms,
            deadline_ms: r.deadline_ms,
            traceparent,
        };
        let out = self.hub.push_task(push).await?;
        Ok(Response::new(pb::PushTaskResponse {
            task_id: out.task.task_id.clone(),
            agent_id: out.task.agent_id.clone().unwrap_or_default(),
            state: pb::task::State::from(out.task.state) as i32,
            created: out.created,
        }))
    }

    type WatchTaskEventsStream = EventStream;

    async fn watch_task_events(
        &self,
        req: Request<pb::WatchTaskEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        allow(&req, Access::Read)?;
        let token_id = principal_token_id(&req);
        let slot = self.watch_slots.acquire(&token_id)?;
        let r = req.into_inner();
        let kinds = r
            .kinds
            .iter()
            .map(|k| {
                pb::task_event::Kind::try_from(*k)
                    .ok()
                    .and_then(|k| k.to_model())
                    .ok_or_else(|| Error::InvalidArgument(format!("unknown event kind {k}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let filter = EventFilter {
            task_id: non_empty(r.task_id),
            agent_id: non_empty(r.agent_id),
            kinds,
        };
        let rx = self.hub.watch(r.after_seq, r.log_id.as_deref(), filter)?;
        let mut shutdown = self.shutdown.clone();
        let stream = ReceiverStream::new(rx)
            .flat_map(|item| {
                // A chunk's events one by one (each frees its room as it is
                // taken), or the error that ends the stream.
                let (chunk, end) = match item {
                    Ok(chunk) => (chunk, None),
                    Err(e) => (Vec::new(), Some(Err(Status::from(e)))),
                };
                let events = chunk
                    .into_iter()
                    .map(|ev| Ok(EventBytes(ev.proto().clone())));
                futures_util::stream::iter(events.chain(end))
            })
            .take_until(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            });
        let revoked = self.hub.verifier().revocations().revoked(&token_id);
        let stream = crate::grpc_limits::guard(Box::pin(stream), slot, revoked);
        let mut response = Response::new(Box::pin(stream) as EventStream);
        if let Ok(v) = self.hub.log_id().parse() {
            response.metadata_mut().insert(LOG_ID_HEADER, v);
        }
        Ok(response)
    }

    async fn get_task(
        &self,
        req: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        allow(&req, Access::Read)?;
        let task = self.hub.get_task(&req.into_inner().task_id).await?;
        Ok(Response::new(pb::Task::from(&task)))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        allow(&req, Access::Read)?;
        let r = req.into_inner();
        let state = pb::task::State::try_from(r.state)
            .map_err(|_| Error::InvalidArgument(format!("unknown state {}", r.state)))?
            .to_model();
        let page = self
            .hub
            .list_tasks(ListQuery {
                state,
                agent_id: non_empty(r.agent_id),
                page_size: r.page_size as usize,
                page_token: non_empty(r.page_token),
            })
            .await?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks: page.tasks.iter().map(pb::Task::from).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
            as_of_seq: page.as_of_seq,
            log_id: page.log_id,
        }))
    }

    async fn cancel_task(
        &self,
        req: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        allow(&req, Access::Write)?;
        let task = self.hub.cancel_task(&req.into_inner().task_id).await?;
        Ok(Response::new(pb::Task::from(&task)))
    }

    async fn retry_task(
        &self,
        req: Request<pb::RetryTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        allow(&req, Access::Write)?;
        let task = self.hub.retry_task(&req.into_inner().task_id).await?;
        Ok(Response::new(pb::Task::from(&task)))
    }

    async fn restart_agent(
        &self,
        req: Request<pb::RestartAgentRequest>,
    ) -> Result<Response<pb::RestartAgentResponse>, Status> {
        allow_admin(&req)?;
        let r = req.into_inner();
        self.hub.restart_agent(&r.agent_id, &r.reason)?;
        Ok(Response::new(pb::RestartAgentResponse {}))
    }

    async fn wait_task(
        &self,
        req: Request<pb::WaitTaskRequest>,
    ) -> Result<Response<pb::Task>, Status> {
        allow(&req, Access::Read)?;
        // A long wait ends when its token is revoked, like a stream.
        let revoked = self
            .hub
            .verifier()
            .revocations()
            .revoked(&principal_token_id(&req));
        let r = req.into_inner();
        let timeout = (r.timeout_ms > 0).then(|| std::time::Duration::from_millis(r.timeout_ms));
        let mut shutdown = self.shutdown.clone();
        let task = tokio::select! {
            task = self.hub.wait_task(&r.task_id, timeout) => task?,
            _ = shutdown.wait_for(|s| *s) => return Err(Error::ShuttingDown.into()),
            _ = revoked => return Err(Status::unauthenticated("token revoked")),
        };
        Ok(Response::new(pb::Task::from(&task)))
    }

    type WatchTaskOutputStream = OutputStream;

    async fn watch_task_output(
        &self,
        req: Request<pb::WatchTaskOutputRequest>,
    ) -> Result<Response<OutputStream>, Status> {
        allow(&req, Access::Read)?;
        let token_id = principal_token_id(&req);
        let slot = self.watch_slots.acquire(&token_id)?;
        let r = req.into_inner();
        let rx = self
            .hub
            .watch_output(&r.task_id, r.after_offset, !r.stored_only)
            .await?;
        let mut shutdown = self.shutdown.clone();
        let stream = ReceiverStream::new(rx)
            .map(|item| match item {
                Ok(c) => Ok(pb::TaskOutputChunk {
                    task_id: c.task_id,
                    offset: c.offset,
                    stream: c.stream.as_str().to_string(),
                    data: c.data,
                    generation: c.generation,
                }),
                Err(e) => Err(Status::from(e)),
            })
            .take_until(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            });
        let revoked = self.hub.verifier().revocations().revoked(&token_id);
        let stream = crate::grpc_limits::guard(Box::pin(stream), slot, revoked);
        Ok(Response::new(Box::pin(stream) as OutputStream))
    }

    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        allow(&req, Access::Read)?;
        let agents = self.hub.list_agents();
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(pb::Agent::from).collect(),
        }))
    }

    type WatchAgentsStream =
        Pin<Box<dyn Stream<Item = Result<pb::ListAgentsResponse, Status>> + Send>>;

    async fn watch_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<Self::WatchAgentsStream>, Status> {
        allow(&req, Access::Read)?;
        let token_id = principal_token_id(&req);
        let slot = self.watch_slots.acquire(&token_id)?;
        let hub = self.hub.clone();
        let changes = hub.agent_changes();
        // A new list on every change, and when an away agent's grace ends
        // (it is then listed as gone).
        let lists = futures_util::stream::unfold(
            (hub, changes, None),
            |(hub, mut changes, grace_ends)| async move {
                if let Some(grace_ends) = grace_ends {
                    let ended = async {
                        match grace_ends {
                            Some(at) => tokio::time::sleep_until(at).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        changed = changes.changed() => changed.ok()?,
                        () = ended => {}
                    }
                    // Coalesce a burst of changes into one list.
                    tokio::time::sleep(AGENTS_DEBOUNCE).await;
                    changes.borrow_and_update();
                }
                let agents = hub.list_agents();
                let next_end = agents
                    .iter()
                    .filter_map(|a| match a.presence {
                        crate::model::AgentPresence::Away { grace_ends, .. } => Some(grace_ends),
                        _ => None,
                    })
                    .min();
                let list = pb::ListAgentsResponse {
                    agents: agents.iter().map(pb::Agent::from).collect(),
                };
                Some((Ok(list), (hub, changes, Some(next_end))))
            },
        );
        let mut shutdown = self.shutdown.clone();
        let stream = lists.take_until(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        });
        let revoked = self.hub.verifier().revocations().revoked(&token_id);
        let stream = crate::grpc_limits::guard(Box::pin(stream), slot, revoked);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn issue_token(
        &self,
        req: Request<pb::IssueTokenRequest>,
    ) -> Result<Response<pb::IssueTokenResponse>, Status> {
        allow(&req, Access::Admin)?;
        let r = req.into_inner();
        let role = Role::parse(&r.role).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "unknown role `{}` (agent, orchestrator, viewer, admin)",
                r.role
            ))
        })?;
        let hub = self.hub.clone();
        let (token, record) =
            tokio::task::spawn_blocking(move || hub.verifier().issue(role, non_empty(r.agent_id)))
                .await
                .map_err(|_| Status::internal("token issue failed"))??;
        Ok(Response::new(pb::IssueTokenResponse {
            id: record.id,
            token,
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        allow(&req, Access::Admin)?;
        let hub = self.hub.clone();
        let tokens = tokio::task::spawn_blocking(move || hub.verifier().list())
            .await
            .map_err(|_| Status::internal("token list failed"))??;
        Ok(Response::new(pb::ListTokensResponse {
            tokens: tokens.into_iter().map(token_info).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        allow(&req, Access::Admin)?;
        let id = req.into_inner().id;
        let hub = self.hub.clone();
        let known = {
            let id = id.clone();
            tokio::task::spawn_blocking(move || hub.verifier().revoke(&id))
                .await
                .map_err(|_| Status::internal("token revoke failed"))??
        };
        if !known {
            return Err(Status::not_found(format!("no token with id {id}")));
        }
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }
}
