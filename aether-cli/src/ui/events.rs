//! `/api/events`: the daemon's `WatchWorkspaces` stream pushed to the page as Server-Sent
//! Events, one `workspace` event per watch event, in the JSON `aether workspace watch -o json`
//! prints.

use std::convert::Infallible;
use std::time::Duration;

use aether_proto::v1 as pb;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::api::ApiError;
use super::Shared;
use crate::watch;

/// Events waiting for a slow page; when it is full the watch waits.
const BUFFER: usize = 64;

pub async fn events(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    let mut stream = s
        .client
        .clone()
        .watch_workspaces(pb::WatchWorkspacesRequest::default())
        .await?
        .into_inner();
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(BUFFER);
    tokio::spawn(async move {
        loop {
            let event = match stream.message().await {
                Ok(Some(e)) => Event::default()
                    .event("workspace")
                    .data(watch::event_json(&e).to_string()),
                Ok(None) => break,
                Err(status) => {
                    let _ = tx
                        .send(Ok(Event::default().event("error").data(
                            serde_json::json!({ "error": status.message() }).to_string(),
                        )))
                        .await;
                    break;
                }
            };
            // The page went away: dropping the stream ends the daemon's watch.
            if tx.send(Ok(event)).await.is_err() {
                break;
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
