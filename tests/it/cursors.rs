//! Watch cursors and page tokens: checked arithmetic, clear errors, no
//! stream that hangs silently, and `log_id` naming the log a cursor belongs to.

use agenthub::pb;
use tonic::Code;

use crate::core_flow::Http;
use crate::helpers::*;

async fn watch_err(
    client: &mut agenthub::client::HubClient,
    req: pb::WatchTaskEventsRequest,
) -> tonic::Status {
    match tokio::time::timeout(WAIT, client.watch_task_events(req)).await {
        Ok(Err(status)) => status,
        Ok(Ok(mut stream)) => {
            // Errors may also come as the first stream item.
            match tokio::time::timeout(WAIT, stream.get_mut().message()).await {
                Ok(Err(status)) => status,
                other => panic!("expected an error, got {other:?}"),
            }
        }
        Err(_) => panic!("the watch call hung"),
    }
}

fn after(seq: u64) -> pb::WatchTaskEventsRequest {
    pb::WatchTaskEventsRequest {
        after_seq: Some(seq),
        ..Default::default()
    }
}

#[tokio::test]
async fn cursors_above_the_head_are_out_of_range_and_never_hang() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    client
        .push(scheduled("one", &[], pb::Priority::Normal))
        .await;
    for cursor in [2, 1_000_001, 1 << 63, u64::MAX] {
        let status = watch_err(&mut client, after(cursor)).await;
        assert_eq!(
            status.code(),
            Code::OutOfRange,
            "cursor {cursor}: {status:?}"
        );
        assert!(status.message().contains("ahead of the log"), "{status:?}");
    }
    // A cursor equal to the head is valid: live from now.
    let mut stream = client.watch_after(1).await;
    let pushed = client
        .push(scheduled("two", &[], pb::Priority::Normal))
        .await;
    let ev = take_events(&mut stream, 1).await.remove(0);
    assert_eq!((ev.seq, ev.task_id), (2, pushed.task_id));
}

#[tokio::test]
async fn page_tokens_at_the_end_of_the_range_give_an_empty_page() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    client
        .push(scheduled("one", &[], pb::Priority::Normal))
        .await;
    for token in [u64::MAX.to_string(), (u64::MAX - 1).to_string()] {
        let page = client
            .list_tasks(pb::ListTasksRequest {
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.tasks.is_empty() && page.next_page_token.is_empty());
    }
    let err = client
        .list_tasks(pb::ListTasksRequest {
            page_token: "18446744073709551616".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The hub is still fine.
    client
        .push(scheduled("two", &[], pb::Priority::Normal))
        .await;
}

#[tokio::test]
async fn log_id_names_the_log_survives_restarts_and_fences_cursors_from_another_log() {
    let hub = TestHub::start().await;
    let mut client = hub.client().await;
    client
        .push(scheduled("one", &[], pb::Priority::Normal))
        .await;
    let page = client
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    let log_id = page.log_id.clone();
    assert!(log_id.starts_with("log-"), "{log_id}");
    let resp = client.watch_task_events(after(0)).await.unwrap();
    let header = resp
        .metadata()
        .get("agenthub-log-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(header, log_id);
    let (_, health) = Http::new(hub.ws_addr).get("/health").await;
    assert_eq!(health["log_id"], log_id.as_str());

    // The same log after a restart: the cursor and its log_id still work.
    let dir = hub.dir.clone();
    let tmp = hub.stop().await;
    let hub = TestHub::start_in(&dir, |_| {}).await;
    let mut client = hub.client().await;
    let mut req = after(0);
    req.log_id = Some(log_id.clone());
    let mut stream = client.watch_task_events(req).await.unwrap().into_inner();
    assert_eq!(take_events(&mut stream, 1).await[0].seq, 1);
    drop(hub.stop().await);
    drop(tmp);

    // A wiped store is a new log: the old cursor is refused, not silently reused.
    let fresh = TestHub::start().await;
    let mut client = fresh.client().await;
    client
        .push(scheduled("one", &[], pb::Priority::Normal))
        .await;
    let mut req = after(0);
    req.log_id = Some(log_id);
    let status = watch_err(&mut client, req).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
}

#[tokio::test]
async fn watch_streams_whose_client_went_away_are_released_at_once() {
    let hub = TestHub::start().await;
    let client = hub.client().await;
    let http = Http::new(hub.ws_addr);
    let mut streams = Vec::new();
    for _ in 0..300 {
        let mut c = client.clone();
        streams.push(c.watch_after(0).await);
    }
    eventually(|| async {
        let text = http.get_text("/metrics").await.1;
        (metric(&text, "agenthub_watchers") == Some(300.0)).then_some(())
    })
    .await;
    // The clients go away while nothing is happening on the hub.
    drop(streams);
    eventually(|| async {
        let text = http.get_text("/metrics").await.1;
        (metric(&text, "agenthub_watchers") == Some(0.0)).then_some(())
    })
    .await;
}
