//! The dashboard: one HTML page, its script and its style, embedded in the binary with
//! `include_str!` (no CDN, no build step, works offline). The page holds no data: it reads the
//! JSON API with the bearer token, which it asks for once (kept in `sessionStorage`) or takes
//! from `?token=` (then removed from the address bar).

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use super::ServeState;

const HTML: &str = include_str!("assets/dashboard.html");
const JS: &str = include_str!("assets/dashboard.js");
const CSS: &str = include_str!("assets/dashboard.css");

pub fn routes() -> Router<ServeState> {
    Router::new()
        .route("/", get(page))
        .route("/assets/dashboard.js", get(script))
        .route("/assets/dashboard.css", get(style))
        .route("/healthz", get(|| async { "ok\n" }))
}

const NO_STORE: (header::HeaderName, &str) = (header::CACHE_CONTROL, "no-store");

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8".to_string()),
            (NO_STORE.0, NO_STORE.1.to_string()),
            (header::CONTENT_SECURITY_POLICY, policy()),
            (header::REFERRER_POLICY, "no-referrer".to_string()),
        ],
        HTML,
    )
}

/// The page's Content-Security-Policy. A report opened from the page (a `blob:` page, which
/// inherits this policy) needs its own inline stylesheet: allowed by its hash, nothing more.
fn policy() -> String {
    format!(
        "default-src 'self'; img-src 'self' data:; style-src 'self' {}; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
        crate::report::style_source()
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            NO_STORE,
        ],
        JS,
    )
}

async fn style() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), NO_STORE],
        CSS,
    )
}
