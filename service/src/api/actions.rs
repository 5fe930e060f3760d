//! ActionService.

use switchyard_proto::v1::{self as pb, action_service_server::ActionService};
use tonic::{Request, Response, Status};

use super::{
    App, body_without_key, convert, decode_token, encode_token, page_size, parse_device_id,
    status::to_status,
};
use crate::{
    domain::{
        Action, ActionId, ActionState, Error, Reason,
        validate::{PushInput, preflight, validate_push},
    },
    store::{ActionQuery, PushOutcome},
};

/// Implements `switchyard.v1.ActionService`.
#[derive(Clone, Debug)]
pub struct Actions(pub App);

fn parse_action_id(s: &str) -> Result<ActionId, Error> {
    if s.is_empty() {
        return Err(Error::invalid(
            "action_id",
            Reason::MissingField,
            "action_id is required",
        ));
    }
    ActionId::parse(s).map_err(|why| {
        Error::invalid(
            "action_id",
            Reason::InvalidField,
            format!("action_id {why}"),
        )
    })
}

fn push_response(o: &PushOutcome) -> pb::PushActionResponse {
    let PushOutcome {
        action,
        cancelled,
        queued_after,
    } = o;
    pb::PushActionResponse {
        action: Some(convert::action_to_proto(action)),
        cancelled_actions: cancelled.iter().map(convert::action_to_proto).collect(),
        queued_after_action_ids: queued_after.iter().map(ToString::to_string).collect(),
    }
}

impl Actions {
    async fn push(&self, req: pb::PushActionRequest) -> Result<pb::PushActionResponse, Error> {
        let app = &self.0;
        let device_id = parse_device_id(&req.device_id, "device_id")?;
        let Some(a) = req.action.as_ref() else {
            return Err(Error::invalid(
                "action",
                Reason::MissingField,
                "action is required",
            ));
        };
        let strategy = convert::strategy_from_proto(req.on_conflict)?;
        let input = PushInput {
            command: convert::command_from_proto(a.command)?,
            power: a.power.as_ref().map(convert::raw_quantity),
            target_soc: a.target_soc.as_ref().map(convert::raw_quantity),
            reserve_soc: a.reserve_soc.as_ref().map(convert::raw_quantity),
            start: a
                .start_time
                .as_ref()
                .map(|t| convert::ts_from_proto(t, "action.start_time"))
                .transpose()?,
            end: a
                .end_time
                .as_ref()
                .map(|t| convert::ts_from_proto(t, "action.end_time"))
                .transpose()?,
        };
        let tenant = app.tenant();
        let horizon = app.horizon_nanos;
        let checker = app.clone();
        let prepare = move |device: &crate::domain::Device, now| {
            let caps = checker.capabilities(device).ok_or_else(|| {
                Error::Internal(format!(
                    "device {} has a driver configuration its driver no longer accepts",
                    device.id
                ))
            })?;
            let push = validate_push(&input, &caps, now, horizon)?;
            preflight(device, strategy, push.start, push.end)?;
            Ok(push)
        };
        if req.validate_only {
            let mut resp = push_response(
                &app.store
                    .push(&tenant, &device_id, prepare, strategy, true, None)
                    .await?,
            );
            if let Some(a) = resp.action.as_mut() {
                a.action_id.clear();
                a.etag.clear();
            }
            return Ok(resp);
        }
        let body = body_without_key(&req, |r| r.request_id.clear());
        app.idempotent(
            "PushAction",
            &req.request_id,
            body,
            push_response,
            |idem| async move {
                app.store
                    .push(&tenant, &device_id, prepare, strategy, false, idem)
                    .await
            },
        )
        .await
        // An immediate action is due now: do not wait for the next poll.
        .inspect(|_| app.wake.notify_one())
    }

    async fn list(&self, req: pb::ListActionsRequest) -> Result<pb::ListActionsResponse, Error> {
        let app = &self.0;
        let device = if req.device_id == "-" {
            None
        } else {
            Some(parse_device_id(&req.device_id, "device_id")?)
        };
        let mut states: Vec<ActionState> = req
            .states
            .iter()
            .map(|s| convert::state_from_proto(*s, "states"))
            .collect::<Result<_, _>>()?;
        states.sort();
        states.dedup();
        let limit = page_size(req.page_size)?;
        let scope = format!(
            "actions:{}:{}",
            req.device_id,
            states
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(",")
        );
        let before = decode_token(&req.page_token, &scope)?
            .map(|s| {
                ActionId::parse(&s).map_err(|_| {
                    Error::invalid(
                        "page_token",
                        Reason::InvalidPageToken,
                        "page_token is malformed",
                    )
                })
            })
            .transpose()?;
        let tenant = app.tenant();
        if let Some(d) = &device {
            // A listing of an unknown device is NOT_FOUND, not an empty page.
            app.store.get_device(&tenant, d).await?;
        }
        let mut actions = app
            .store
            .list_actions(
                &tenant,
                ActionQuery {
                    device: device.as_ref(),
                    states: &states,
                    before,
                    limit: limit + 1,
                },
            )
            .await?;
        let more = actions.len() > limit as usize;
        actions.truncate(limit as usize);
        let next = match actions.last() {
            Some(last) if more => encode_token(&scope, &last.id.to_string()),
            _ => String::new(),
        };
        Ok(pb::ListActionsResponse {
            actions: actions.iter().map(convert::action_to_proto).collect(),
            next_page_token: next,
        })
    }

    async fn cancel(&self, req: pb::CancelActionRequest) -> Result<pb::Action, Error> {
        let app = &self.0;
        let device_id = parse_device_id(&req.device_id, "device_id")?;
        let action_id = parse_action_id(&req.action_id)?;
        let etag = (!req.etag.is_empty()).then(|| req.etag.clone());
        let body = body_without_key(&req, |r| r.request_id.clear());
        let tenant = app.tenant();
        app.idempotent(
            "CancelAction",
            &req.request_id,
            body,
            |a: &Action| convert::action_to_proto(a),
            |idem| async move {
                app.store
                    .cancel_action(&tenant, &device_id, &action_id, etag.as_deref(), idem)
                    .await
            },
        )
        .await
        .inspect(|_| app.wake.notify_one())
    }
}

#[tonic::async_trait]
impl ActionService for Actions {
    async fn push_action(
        &self,
        request: Request<pb::PushActionRequest>,
    ) -> Result<Response<pb::PushActionResponse>, Status> {
        self.push(request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn get_action(
        &self,
        request: Request<pb::GetActionRequest>,
    ) -> Result<Response<pb::Action>, Status> {
        let req = request.into_inner();
        let run = async {
            let device_id = parse_device_id(&req.device_id, "device_id")?;
            let action_id = parse_action_id(&req.action_id)?;
            let a = self
                .0
                .store
                .get_action(&self.0.tenant(), &device_id, &action_id)
                .await?;
            Ok(convert::action_to_proto(&a))
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn list_actions(
        &self,
        request: Request<pb::ListActionsRequest>,
    ) -> Result<Response<pb::ListActionsResponse>, Status> {
        self.list(request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn cancel_action(
        &self,
        request: Request<pb::CancelActionRequest>,
    ) -> Result<Response<pb::Action>, Status> {
        self.cancel(request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }
}
