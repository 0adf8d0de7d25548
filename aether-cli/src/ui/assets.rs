//! The page's files, embedded at build time from `ui/dist` (see `aether-cli/build.rs`).

use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

include!(concat!(env!("OUT_DIR"), "/ui_assets.rs"));

fn find(path: &str) -> Option<&'static (&'static str, &'static str, &'static [u8])> {
    ASSETS.iter().find(|(p, _, _)| *p == path)
}

/// Whether this binary carries the page (it does when `ui/dist` existed at build time).
pub fn built() -> bool {
    find("/index.html").is_some()
}

pub async fn serve(uri: Uri) -> Response {
    let path = match uri.path() {
        "/" => "/index.html",
        p => p,
    };
    if let Some((_, content_type, body)) = find(path) {
        return ([(header::CONTENT_TYPE, *content_type)], *body).into_response();
    }
    if path == "/index.html" {
        return (
            StatusCode::NOT_FOUND,
            "this aether was built without the web UI's assets: run `npm ci && npm run build` in ui/ \
             (scripts/install.sh does), then build aether again\n",
        )
            .into_response();
    }
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}
