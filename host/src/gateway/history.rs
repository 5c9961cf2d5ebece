//! The history API: `GET /api/v1/alerts`, `GET /api/v1/events` and
//! `GET /api/v1/devices/{device}/transitions`, read from the same
//! per-tenant history that resuming WebSocket subscriptions replay.
//!
//! Parameters: `since` and `until` (recorded times, inclusive: ms since
//! the Unix epoch or RFC 3339 in UTC), `limit` (100; at most 1,000),
//! `after` (the `next` of the page before), `order` (`oldest` first, the
//! default, or `newest` first), and for admins and without authentication
//! `tenant` (default: every tenant). Items are ordered by the time
//! recorded, then tenant, then offset.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::access::{sees_device, unknown_device};
use super::auth::Scope;
use super::caller::Caller;
use super::{AppError, AppState};
use crate::bus::Publication;
use crate::bus::history::{HistoryKind, RangeQuery, Recorded};
use crate::message::now_ms;

/// Items per page unless `limit` says otherwise, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// The query parameters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Params {
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
    tenant: Option<String>,
    order: Option<String>,
}

fn bad(message: impl Into<String>) -> AppError {
    AppError::new(StatusCode::BAD_REQUEST, "bad_query", message)
}

fn unavailable(error: crate::bus::BusError) -> AppError {
    AppError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "bus_unavailable",
        error.to_string(),
    )
}

/// A time parameter: ms since the Unix epoch, or RFC 3339 in UTC.
fn parse_time(name: &str, text: &str) -> Result<i64, AppError> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let time = humantime::parse_rfc3339(text).map_err(|e| {
        bad(format!(
            "{name}: {text:?} is neither ms since the Unix epoch nor an RFC 3339 time in UTC ({e})"
        ))
    })?;
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad(format!("{name}: {text:?} is before 1970")))?;
    Ok(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
}

/// Where a page ends: the last item's recorded time, offset and tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    ms: i64,
    offset: u64,
    tenant: String,
}

impl Cursor {
    fn of(entry: &Recorded) -> Cursor {
        Cursor {
            ms: entry.recorded_ms,
            offset: entry.position.offset,
            tenant: entry.position.tenant.clone(),
        }
    }

    fn text(&self) -> String {
        format!("{}.{}.{}", self.ms, self.offset, self.tenant)
    }

    fn parse(text: &str) -> Result<Cursor, AppError> {
        let wrong = || {
            bad(format!(
                "after: {text:?} is not the next of an earlier page"
            ))
        };
        let mut parts = text.splitn(3, '.');
        let ms = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(wrong)?;
        let offset = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(wrong)?;
        let tenant = parts.next().ok_or_else(wrong)?.to_owned();
        Ok(Cursor { ms, offset, tenant })
    }

    /// The same bound within one tenant's history, which is ordered by
    /// (ms, offset): entries past the cursor in the order of (ms, tenant,
    /// offset), forwards or (`newest_first`) backwards.
    fn within(&self, tenant: &str, newest_first: bool) -> (i64, u64) {
        use std::cmp::Ordering::{Equal, Greater, Less};
        match (tenant.cmp(self.tenant.as_str()), newest_first) {
            (Equal, _) => (self.ms, self.offset),
            // Forwards: a smaller tenant's entries of the same ms came before.
            (Less, false) => (self.ms, u64::MAX),
            (Greater, false) => (self.ms - 1, u64::MAX),
            // Backwards: a smaller tenant's entries of the same ms come next.
            (Less, true) => (self.ms + 1, 0),
            (Greater, true) => (self.ms, 0),
        }
    }
}

/// The tenants whose history the caller reads: its own, or for admins and
/// without authentication the one named, else every tenant of the registry
/// and that of unregistered devices.
fn tenants(app: &AppState, caller: &Caller, named: Option<&str>) -> Result<Vec<String>, AppError> {
    if let Some(identity) = caller.identity()
        && !identity.allows(Scope::Admin)
    {
        let own = identity.tenant_name();
        if named.is_some_and(|n| n != own) {
            return Err(AppError::new(
                StatusCode::NOT_FOUND,
                "unknown_tenant",
                format!("no tenant {:?} is known", named.unwrap_or_default()),
            ));
        }
        return Ok(vec![own.to_owned()]);
    }
    if let Some(named) = named {
        return Ok(vec![named.to_owned()]);
    }
    let mut all: Vec<String> = app
        .pipeline
        .registry
        .load()
        .iter()
        .map(|d| d.tenant.clone())
        .collect();
    all.push(String::new());
    all.sort();
    all.dedup();
    Ok(all)
}

/// Reads one page of `kind` (of `device`, when given) from `tenants`.
async fn page(
    app: &AppState,
    tenants: &[String],
    kind: HistoryKind,
    device: Option<&str>,
    params: &Params,
) -> Result<Json<Value>, AppError> {
    let since_ms = match &params.since {
        Some(text) => parse_time("since", text)?,
        None => 0,
    };
    let until_ms = match &params.until {
        Some(text) => parse_time("until", text)?,
        None => now_ms(),
    };
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(bad(format!("limit: from 1 to {MAX_LIMIT}, not {limit}")));
    }
    let after = params.after.as_deref().map(Cursor::parse).transpose()?;
    let newest_first = match params.order.as_deref() {
        None | Some("oldest") => false,
        Some("newest") => true,
        Some(other) => return Err(bad(format!("order: oldest or newest, not {other:?}"))),
    };
    let mut items: Vec<Recorded> = Vec::new();
    for tenant in tenants {
        let query = RangeQuery {
            tenant: tenant.clone(),
            kind,
            device: device.map(str::to_owned),
            since_ms,
            until_ms,
            after: after.as_ref().map(|c| c.within(tenant, newest_first)),
            newest_first,
            limit,
        };
        items.extend(
            app.pipeline
                .bus
                .history_range(&query)
                .await
                .map_err(unavailable)?,
        );
    }
    items.sort_by(|a, b| {
        let order = (a.recorded_ms, &a.position.tenant, a.position.offset).cmp(&(
            b.recorded_ms,
            &b.position.tenant,
            b.position.offset,
        ));
        if newest_first { order.reverse() } else { order }
    });
    items.truncate(limit);
    let next = (items.len() == limit)
        .then(|| items.last().map(|last| Cursor::of(last).text()))
        .flatten();
    let items: Vec<Value> = items.iter().filter_map(item).collect();
    Ok(Json(json!({"items": items, "next": next})))
}

/// One item: the alert, event or transition as its channel carries it,
/// with `position` and `recorded_at` (ms).
fn item(entry: &Recorded) -> Option<Value> {
    let mut value = match &entry.publication {
        Publication::Alert(alert) => serde_json::to_value(alert).ok()?,
        Publication::Event(event) => serde_json::to_value(event).ok()?,
        Publication::Status(change) => serde_json::to_value(change).ok()?,
        Publication::Command(command) => command.view(),
        Publication::Telemetry(_) => return None,
    };
    value["recorded_at"] = json!(entry.recorded_ms);
    Some(value)
}

fn params(query: Result<Query<Params>, QueryRejection>) -> Result<Params, AppError> {
    query
        .map(|Query(params)| params)
        .map_err(|rejection| bad(rejection.body_text()))
}

/// A page of the caller's alerts or events.
async fn listed(
    app: &AppState,
    caller: &Caller,
    query: Result<Query<Params>, QueryRejection>,
    kind: HistoryKind,
) -> Result<Json<Value>, AppError> {
    caller.require(Scope::Read)?;
    let params = params(query)?;
    let tenants = tenants(app, caller, params.tenant.as_deref())?;
    page(app, &tenants, kind, None, &params).await
}

/// `GET /api/v1/alerts`.
pub(super) async fn alerts(
    State(app): State<AppState>,
    caller: Caller,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Value>, AppError> {
    listed(&app, &caller, query, HistoryKind::Alert).await
}

/// `GET /api/v1/events`.
pub(super) async fn events(
    State(app): State<AppState>,
    caller: Caller,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Value>, AppError> {
    listed(&app, &caller, query, HistoryKind::Event).await
}

/// `GET /api/v1/devices/{device}/transitions`: the device's status
/// transitions, from its tenant's history. Another tenant's device is
/// answered exactly like one that does not exist.
pub(super) async fn transitions(
    State(app): State<AppState>,
    caller: Caller,
    Path(device): Path<String>,
    query: Result<Query<Params>, QueryRejection>,
) -> Result<Json<Value>, AppError> {
    let pipeline = &app.pipeline;
    if !sees_device(pipeline, caller.identity(), &device) {
        return Err(AppError::new(
            StatusCode::NOT_FOUND,
            "unknown_device",
            unknown_device(&device),
        ));
    }
    caller.require(Scope::Read)?;
    let mut params = params(query)?;
    if params.tenant.take().is_some() {
        return Err(bad("tenant: a device's transitions are its tenant's"));
    }
    let tenants = [pipeline.tenant_of(&device)];
    page(&app, &tenants, HistoryKind::Status, Some(&device), &params).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_order_across_tenants() {
        let cursor = Cursor::parse("1000.7.acme.eu").unwrap();
        assert_eq!(cursor.tenant, "acme.eu");
        assert_eq!(Cursor::parse(&cursor.text()).unwrap(), cursor);
        assert_eq!(cursor.within("acme.eu", false), (1000, 7));
        assert_eq!(cursor.within("a", false), (1000, u64::MAX));
        assert_eq!(cursor.within("globex", false), (999, u64::MAX));
        assert_eq!(cursor.within("acme.eu", true), (1000, 7));
        assert_eq!(cursor.within("a", true), (1001, 0));
        assert_eq!(cursor.within("globex", true), (1000, 0));
        assert!(Cursor::parse("x.1.a").is_err());
        assert!(Cursor::parse("1").is_err());
    }

    #[test]
    fn times_are_ms_or_rfc3339() {
        assert_eq!(parse_time("since", "1500").unwrap(), 1500);
        assert_eq!(
            parse_time("since", "2026-12-02T00:00:00Z").unwrap(),
            1_796_169_600_000
        );
        assert_eq!(
            parse_time("since", "yesterday").unwrap_err().code,
            "bad_query"
        );
    }
}
