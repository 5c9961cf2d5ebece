//! One authentication layer for the whole router, applied by `app()`: every
//! request's credentials are checked before a handler runs, and handlers
//! receive the result as an extractor.
//!
//! - Public routes (`/health`, `/ready`, `/`) need nothing.
//! - WebSocket upgrades may carry credentials (a header, or `?token=` /
//!   `?api_key=` unless `allow_query_tokens = false`); checked here, used
//!   by the endpoint, which otherwise asks for them in its first frame.
//! - Every other route needs valid credentials (401 otherwise) and then a
//!   scope: [`Caller::require`] answers 403.

use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::{AuthError, Credentials, Identity, Scope};
use super::{AppError, AppState};

/// Who is calling a route that needs credentials.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `None` when authentication is off: every caller may do everything.
    identity: Option<Identity>,
}

impl Caller {
    /// The caller's identity; `None` when authentication is off.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// Whether the caller may do what `scope` covers.
    pub fn allows(&self, scope: Scope) -> bool {
        self.identity.as_ref().is_none_or(|i| i.allows(scope))
    }

    /// 403 unless the caller may do what `scope` covers.
    pub fn require(&self, scope: Scope) -> Result<(), AppError> {
        if self.allows(scope) {
            Ok(())
        } else {
            Err(AppError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this needs the {} scope", scope.as_str()),
            ))
        }
    }

    /// Whether the caller sees devices of `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.identity.as_ref().is_none_or(|i| i.sees(tenant))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            AppError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no_caller",
                "this route is not behind the authentication layer",
            )
        })
    }
}

/// The credentials of a WebSocket upgrade, checked: `None` when none came.
#[derive(Debug, Clone)]
pub struct UpgradeAuth(pub Option<Result<Option<Identity>, AuthError>>);

impl<S: Send + Sync> FromRequestParts<S> for UpgradeAuth {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<UpgradeAuth>()
            .cloned()
            .unwrap_or(UpgradeAuth(None)))
    }
}

/// Credentials in the headers: `Authorization: Bearer <jwt or key>`, or
/// `X-API-Key: <key>`.
pub fn header_credentials(headers: &HeaderMap) -> Credentials {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    Credentials {
        token: header(axum::http::header::AUTHORIZATION.as_str())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|v| v.trim().to_owned()),
        api_key: header("x-api-key").map(str::to_owned),
    }
}

/// `?token=` and `?api_key=` of a request's URL.
fn query_credentials(uri: &Uri) -> Credentials {
    #[derive(Deserialize, Default)]
    struct AuthQuery {
        token: Option<String>,
        api_key: Option<String>,
    }
    let query = Query::<AuthQuery>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default();
    Credentials {
        token: query.token.filter(|t| !t.is_empty()),
        api_key: query.api_key.filter(|k| !k.is_empty()),
    }
}

/// The layer of every route that needs credentials: 401 without valid
/// ones; the [`Caller`] for the handler otherwise.
pub async fn require_credentials(
    State(app): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let auth = &app.ws.auth;
    if !auth.enabled() {
        request.extensions_mut().insert(Caller { identity: None });
        return next.run(request).await;
    }
    let credentials = header_credentials(request.headers());
    if credentials.is_empty() && !query_credentials(request.uri()).is_empty() {
        return unauthenticated(
            "credentials in the URL are accepted on WebSocket upgrades only; send Authorization: Bearer or X-API-Key",
            "unauthenticated",
        );
    }
    match auth.check(&credentials) {
        Ok(identity) => {
            request.extensions_mut().insert(Caller { identity });
            next.run(request).await
        }
        Err(error) => {
            metrics::counter!("sluice_auth_failures_total", "code" => error.code()).increment(1);
            unauthenticated(&error.to_string(), error.code())
        }
    }
}

fn unauthenticated(message: &str, code: &'static str) -> Response {
    AppError::new(StatusCode::UNAUTHORIZED, code, message).into_response()
}

/// The layer of the WebSocket upgrades: checks credentials when there are
/// any (headers, or the query string where allowed) and leaves the result
/// for the endpoint.
pub async fn upgrade_credentials(
    State(app): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let auth = &app.ws.auth;
    let mut credentials = header_credentials(request.headers());
    let mut checked = None;
    if credentials.is_empty() {
        let from_query = query_credentials(request.uri());
        if !from_query.is_empty() {
            if auth.allows_query_tokens() {
                credentials = from_query;
            } else {
                checked = Some(Err(AuthError::QueryTokensDisabled));
            }
        }
    }
    if checked.is_none() && !credentials.is_empty() {
        checked = Some(auth.check(&credentials));
    }
    request.extensions_mut().insert(UpgradeAuth(checked));
    next.run(request).await
}

/// The layer of the routes that need a scope beyond authentication.
pub async fn require_admin(caller: Caller, request: Request, next: Next) -> Response {
    match caller.require(Scope::Admin) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}
