//! `GET /`: the dashboard, one HTML page embedded in the binary. It uses
//! only the public API (`/ws`, `GET /api/v1/alerts` and `GET /api/v1/scripts`), so it is also a
//! working example of a dashboard built on sluice.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("../../assets/dashboard.html");

/// `GET /`: the dashboard page.
pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
