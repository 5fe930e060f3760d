//! WebhookService: a tenant's webhook endpoints and their delivery log
//! (scope `webhooks:manage`; docs/events.md). Delivery itself is
//! `crate::delivery`.

use std::time::Duration;

use switchyard_proto::v1::{self as pb, webhook_service_server::WebhookService};
use tonic::{Request, Response, Status};

use super::{App, convert::ts_to_proto, decode_token, encode_token, page_size};
use crate::{
    domain::{Error, Reason, Ts},
    store::{AttemptRecord, EndpointChange, EndpointRecord},
    webhooks::SigningSecret,
};

/// Longest endpoint description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 256;
/// How long a rotated-out secret signs by default.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(24 * 3600);
/// Longest overlap of a rotation.
pub const MAX_OVERLAP: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long delivery attempts are kept in the log.
pub const ATTEMPT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most attempts kept per endpoint (the newest).
pub const ATTEMPTS_KEPT: u64 = 10_000;

/// WebhookService over the handlers' state.
#[derive(Clone, Debug)]
pub struct Webhooks(pub App);

fn disabled_reason(r: Option<&str>) -> i32 {
    use pb::WebhookDisabledReason as R;
    (match r {
        None => R::Unspecified,
        Some("GONE") => R::Gone,
        Some("FAILING") => R::Failing,
        Some(_) => R::ByUser,
    }) as i32
}

/// An endpoint as its owner sees it (never its secrets).
pub fn endpoint_to_proto(e: &EndpointRecord, now: Ts) -> pb::WebhookEndpoint {
    pb::WebhookEndpoint {
        endpoint_id: e.id.clone(),
        url: e.url.clone(),
        event_types: e
            .event_types
            .iter()
            .filter_map(|t| pb::EventType::from_str_name(t))
            .map(|t| t as i32)
            .collect(),
        enabled: e.enabled,
        description: e.description.clone(),
        create_time: Some(ts_to_proto(e.created)),
        update_time: Some(ts_to_proto(e.updated)),
        disabled_reason: disabled_reason(e.disabled_reason.as_deref()),
        delivered_cursor: e.delivered_cursor,
        failing_since: e.failing_since.map(ts_to_proto),
        next_attempt_time: (e.enabled && e.failing_since.is_some())
            .then(|| ts_to_proto(e.next_attempt)),
        previous_secret_expire_time: e
            .previous
            .as_ref()
            .filter(|(_, until)| until.0 > now.0)
            .map(|(_, until)| ts_to_proto(*until)),
        failed_attempts: i32::try_from(e.attempts).unwrap_or(i32::MAX),
    }
}

fn attempt_to_proto(a: &AttemptRecord) -> pb::WebhookDelivery {
    use pb::WebhookDeliveryOutcome as O;
    let outcome = match a.outcome.as_str() {
        "DELIVERED" => O::Delivered,
        "GONE" => O::Gone,
        "FAILED" => O::Failed,
        _ => O::Unspecified,
    };
    let latency = Duration::from_micros(u64::try_from(a.latency_us).unwrap_or(0));
    pb::WebhookDelivery {
        endpoint_id: a.endpoint_id.clone(),
        event_id: format!("ev-{}", a.cursor),
        cursor: a.cursor,
        event_type: pb::EventType::from_str_name(&a.event_type).unwrap_or_default() as i32,
        attempt: i32::try_from(a.attempt).unwrap_or(i32::MAX),
        attempt_time: Some(ts_to_proto(a.at)),
        outcome: outcome as i32,
        http_status: i32::from(a.http_status),
        latency: Some(prost_types::Duration {
            seconds: i64::try_from(latency.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(latency.subsec_nanos()).unwrap_or(0),
        }),
        error: a.error.clone(),
        next_attempt_time: a.next_attempt.map(ts_to_proto),
    }
}

/// Checks a receiver URL against the operator's policy; the error never
/// repeats the URL (it may carry a token).
fn check_url(app: &App, url: &str, field: &str) -> Result<(), Error> {
    if url.is_empty() {
        return Err(Error::invalid(
            field,
            Reason::MissingField,
            format!("{field} is required"),
        ));
    }
    app.webhooks
        .policy
        .check(url)
        .map(|_| ())
        .map_err(|why| Error::invalid(field, Reason::InvalidField, format!("{field} {why}")))
}

fn check_description(d: &str, field: &str) -> Result<(), Error> {
    if d.len() > MAX_DESCRIPTION_BYTES || d.chars().any(char::is_control) {
        return Err(Error::invalid(
            field,
            Reason::InvalidField,
            format!("at most {MAX_DESCRIPTION_BYTES} bytes of text, without control characters"),
        ));
    }
    Ok(())
}

/// The event type names of a request, deduplicated in order.
fn event_types(types: &[i32], field: &str) -> Result<Vec<String>, Error> {
    let mut names: Vec<String> = Vec::new();
    for (i, t) in types.iter().enumerate() {
        match pb::EventType::try_from(*t) {
            Ok(pb::EventType::Unspecified) | Err(_) => {
                return Err(Error::invalid(
                    format!("{field}[{i}]"),
                    Reason::InvalidField,
                    format!("{t} is not an event type"),
                ));
            }
            Ok(t) => {
                let name = t.as_str_name().to_owned();
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
    }
    Ok(names)
}

fn endpoint_id(id: &str) -> Result<&str, Error> {
    if id.is_empty() {
        return Err(Error::invalid(
            "endpoint_id",
            Reason::MissingField,
            "endpoint_id is required",
        ));
    }
    if id.len() > 64 || id.chars().any(char::is_control) {
        // Not one this server issued: it names nothing.
        return Err(Error::WebhookEndpointNotFound {
            endpoint_id: id.chars().filter(|c| !c.is_control()).take(64).collect(),
        });
    }
    Ok(id)
}

fn overlap(d: Option<prost_types::Duration>) -> Result<Duration, Error> {
    let Some(d) = d else {
        return Ok(DEFAULT_OVERLAP);
    };
    let bad = || {
        Error::invalid(
            "overlap",
            Reason::InvalidField,
            "overlap must be between 0 and 7 days",
        )
    };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(bad());
    }
    let d = Duration::from_secs(u64::try_from(d.seconds).map_err(|_| bad())?)
        .saturating_add(Duration::from_nanos(u64::try_from(d.nanos).unwrap_or(0)));
    if d > MAX_OVERLAP {
        return Err(bad());
    }
    Ok(d)
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX / 2)
}

impl Webhooks {
    async fn create(
        app: &App,
        r: pb::CreateWebhookEndpointRequest,
    ) -> Result<pb::CreateWebhookEndpointResponse, Error> {
        check_url(app, &r.url, "url")?;
        check_description(&r.description, "description")?;
        let types = event_types(&r.event_types, "event_types")?;
        let tenant = app.tenant();
        let now = app.clock.now();
        // It receives what is committed after it: from the newest event,
        // or from the horizon if that is later.
        let start = app
            .store
            .latest_event(&tenant)
            .await?
            .max(app.store.event_horizon(&tenant).await?);
        let (secret, text) = SigningSecret::generate()?;
        let record = EndpointRecord {
            id: format!("wh_{}", uuid::Uuid::now_v7().simple()),
            tenant,
            url: r.url,
            event_types: types,
            description: r.description,
            enabled: true,
            disabled_reason: None,
            secret,
            previous: None,
            delivered_cursor: start,
            attempts: 0,
            failing_since: None,
            next_attempt: now,
            created: now,
            updated: now,
        };
        app.store
            .create_webhook(&record, app.webhooks.max_endpoints)
            .await?;
        tracing::info!(
            tenant = record.tenant.as_str(),
            endpoint_id = record.id,
            by = app.caller.key_id.as_deref().unwrap_or("local"),
            "webhook endpoint created"
        );
        Ok(pb::CreateWebhookEndpointResponse {
            endpoint: Some(endpoint_to_proto(&record, now)),
            secret: text,
        })
    }

    async fn update(
        app: &App,
        r: pb::UpdateWebhookEndpointRequest,
    ) -> Result<pb::WebhookEndpoint, Error> {
        let Some(e) = r.endpoint else {
            return Err(Error::invalid(
                "endpoint",
                Reason::MissingField,
                "endpoint is required",
            ));
        };
        let id = endpoint_id(&e.endpoint_id).map_err(|err| match err {
            Error::Invalid(_) => Error::invalid(
                "endpoint.endpoint_id",
                Reason::MissingField,
                "endpoint.endpoint_id is required",
            ),
            other => other,
        })?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                Reason::MissingField,
                "update_mask must name the fields to change: url, event_types, enabled, description",
            ));
        }
        let mut change = EndpointChange::default();
        for p in &paths {
            match p.as_str() {
                "url" => {
                    check_url(app, &e.url, "endpoint.url")?;
                    change.url = Some(e.url.clone());
                }
                "event_types" => {
                    change.event_types = Some(event_types(&e.event_types, "endpoint.event_types")?);
                }
                "enabled" => change.enabled = Some(e.enabled),
                "description" => {
                    check_description(&e.description, "endpoint.description")?;
                    change.description = Some(e.description.clone());
                }
                other => {
                    return Err(Error::invalid(
                        "update_mask",
                        Reason::InvalidField,
                        format!(
                            "{:?} cannot be changed: url, event_types, enabled, description can",
                            other.chars().take(64).collect::<String>()
                        ),
                    ));
                }
            }
        }
        let now = app.clock.now();
        let record = app
            .store
            .update_webhook(&app.tenant(), id, &change, now)
            .await?;
        Ok(endpoint_to_proto(&record, now))
    }
}

#[tonic::async_trait]
impl WebhookService for Webhooks {
    async fn create_webhook_endpoint(
        &self,
        request: Request<pb::CreateWebhookEndpointRequest>,
    ) -> Result<Response<pb::CreateWebhookEndpointResponse>, Status> {
        let app = self.0.for_call(&request)?;
        Ok(Response::new(
            Self::create(&app, request.into_inner()).await?,
        ))
    }

    async fn get_webhook_endpoint(
        &self,
        request: Request<pb::GetWebhookEndpointRequest>,
    ) -> Result<Response<pb::WebhookEndpoint>, Status> {
        let app = self.0.for_call(&request)?;
        let r = request.into_inner();
        let id = endpoint_id(&r.endpoint_id)?;
        let e = app.store.get_webhook(&app.tenant(), id).await?;
        Ok(Response::new(endpoint_to_proto(&e, app.clock.now())))
    }

    async fn list_webhook_endpoints(
        &self,
        request: Request<pb::ListWebhookEndpointsRequest>,
    ) -> Result<Response<pb::ListWebhookEndpointsResponse>, Status> {
        let app = self.0.for_call(&request)?;
        let r = request.into_inner();
        let size = page_size(r.page_size)?;
        let tenant = app.tenant();
        let scope = format!("webhooks:{}", tenant.as_str());
        let after = decode_token(&r.page_token, &scope, " (the same tenant's key)")?;
        let mut list = app
            .store
            .list_webhooks(&tenant, after.as_deref(), size + 1)
            .await?;
        let more = list.len() > size as usize;
        list.truncate(size as usize);
        let next = match list.last() {
            Some(last) if more => encode_token(&scope, &last.id),
            _ => String::new(),
        };
        let now = app.clock.now();
        Ok(Response::new(pb::ListWebhookEndpointsResponse {
            endpoints: list.iter().map(|e| endpoint_to_proto(e, now)).collect(),
            next_page_token: next,
        }))
    }

    async fn update_webhook_endpoint(
        &self,
        request: Request<pb::UpdateWebhookEndpointRequest>,
    ) -> Result<Response<pb::WebhookEndpoint>, Status> {
        let app = self.0.for_call(&request)?;
        Ok(Response::new(
            Self::update(&app, request.into_inner()).await?,
        ))
    }

    async fn delete_webhook_endpoint(
        &self,
        request: Request<pb::DeleteWebhookEndpointRequest>,
    ) -> Result<Response<pb::DeleteWebhookEndpointResponse>, Status> {
        let app = self.0.for_call(&request)?;
        let r = request.into_inner();
        let id = endpoint_id(&r.endpoint_id)?;
        app.store.delete_webhook(&app.tenant(), id).await?;
        // Its log is forgotten in the background, a batch at a time (what
        // a crash leaves is swept within the log's retention).
        let store = app.store.clone();
        let gone = id.to_owned();
        tokio::spawn(async move {
            while let Ok(n) = store.forget_webhook_attempts(&gone, None, 1000).await {
                if n == 0 {
                    break;
                }
            }
        });
        tracing::info!(
            tenant = app.tenant().as_str(),
            endpoint_id = id,
            "webhook endpoint deleted"
        );
        Ok(Response::new(pb::DeleteWebhookEndpointResponse {}))
    }

    async fn rotate_webhook_secret(
        &self,
        request: Request<pb::RotateWebhookSecretRequest>,
    ) -> Result<Response<pb::RotateWebhookSecretResponse>, Status> {
        let app = self.0.for_call(&request)?;
        let r = request.into_inner();
        let id = endpoint_id(&r.endpoint_id)?;
        let overlap = overlap(r.overlap)?;
        let now = app.clock.now();
        let (secret, text) = SigningSecret::generate()?;
        let e = app
            .store
            .rotate_webhook_secret(
                &app.tenant(),
                id,
                &secret,
                now.plus_nanos(nanos(overlap)),
                now,
            )
            .await?;
        tracing::info!(
            tenant = app.tenant().as_str(),
            endpoint_id = id,
            overlap_seconds = overlap.as_secs(),
            "webhook secret rotated"
        );
        Ok(Response::new(pb::RotateWebhookSecretResponse {
            endpoint: Some(endpoint_to_proto(&e, now)),
            secret: text,
        }))
    }

    async fn list_webhook_deliveries(
        &self,
        request: Request<pb::ListWebhookDeliveriesRequest>,
    ) -> Result<Response<pb::ListWebhookDeliveriesResponse>, Status> {
        let app = self.0.for_call(&request)?;
        let r = request.into_inner();
        let id = endpoint_id(&r.endpoint_id)?;
        let size = page_size(r.page_size)?;
        let tenant = app.tenant();
        // Another tenant's endpoint is not found, like a missing one.
        app.store.get_webhook(&tenant, id).await?;
        let scope = format!("deliveries:{}:{id}", tenant.as_str());
        let before = decode_token(
            &r.page_token,
            &scope,
            " (endpoint_id must stay the same from page to page)",
        )?
        .map(|t| {
            t.parse::<i64>().map_err(|_| {
                Error::invalid(
                    "page_token",
                    Reason::InvalidPageToken,
                    "page_token is malformed",
                )
            })
        })
        .transpose()?;
        let mut list = app
            .store
            .list_webhook_attempts(&tenant, id, before, size + 1)
            .await?;
        let more = list.len() > size as usize;
        list.truncate(size as usize);
        let next = match list.last() {
            Some((last, _)) if more => encode_token(&scope, &last.to_string()),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListWebhookDeliveriesResponse {
            deliveries: list.iter().map(|(_, a)| attempt_to_proto(a)).collect(),
            next_page_token: next,
        }))
    }
}
