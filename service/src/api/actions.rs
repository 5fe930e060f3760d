//! ActionService: parse the request, delegate to the store, convert back.

use switchyard_proto::v1::{self as pb, action_service_server::ActionService};
use tonic::{Request, Response, Status};

use super::{App, convert, encode_token};
use crate::{
    domain::{
        Action, Error,
        validate::{preflight, validate_push},
    },
    store::{ActionQuery, PushOutcome},
};

/// Implements `switchyard.v1.ActionService`.
#[derive(Clone, Debug)]
pub struct Actions(pub App);

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
    async fn push(&self, req: convert::PushAction) -> Result<pb::PushActionResponse, Error> {
        let app = &self.0;
        let convert::PushAction {
            device_id,
            input,
            strategy,
            validate_only,
            idem,
        } = req;
        let tenant = app.tenant();
        let horizon = app.horizon_nanos;
        let checker = app.clone();
        // Validated against the device as the push's transaction reads it.
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
        if validate_only {
            // Changes nothing, so nothing to make idempotent; a malformed
            // key is refused all the same.
            if !idem.request_id.is_empty() {
                super::check_request_id(&idem.request_id)?;
            }
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
        let ran = app
            .idempotent(
                "PushAction",
                super::Prework::None,
                &idem,
                push_response,
                |commit| async {
                    app.store
                        .push_once(&tenant, &device_id, prepare, strategy, commit)
                        .await
                },
            )
            .await?;
        // An action due before the dispatcher's next look is not left
        // waiting for it; one due later is found by that look, and waking
        // the dispatcher for it would only add a claim transaction.
        if let super::Ran::Fresh(o) = &ran {
            app.wake.due(o.action.start);
        }
        Ok(ran.answer(|o| push_response(&o)))
    }

    async fn list(&self, req: convert::ListActions) -> Result<pb::ListActionsResponse, Error> {
        let app = &self.0;
        let tenant = app.tenant();
        if let Some(d) = &req.device {
            // A listing of an unknown device is NOT_FOUND, not an empty page.
            app.store.get_device(&tenant, d).await?;
        }
        let mut actions = app
            .store
            .list_actions(
                &tenant,
                ActionQuery {
                    device: req.device.as_ref(),
                    states: &req.states,
                    before: req.before,
                    limit: req.size + 1,
                },
            )
            .await?;
        let more = actions.len() > req.size as usize;
        actions.truncate(req.size as usize);
        let next = match actions.last() {
            Some(last) if more => encode_token(&req.scope, &last.id.to_string()),
            _ => String::new(),
        };
        Ok(pb::ListActionsResponse {
            actions: actions.iter().map(convert::action_to_proto).collect(),
            next_page_token: next,
        })
    }

    async fn history(
        &self,
        req: convert::ListActionHistory,
    ) -> Result<pb::ListActionHistoryResponse, Error> {
        let app = &self.0;
        let tenant = app.tenant();
        // Another tenant's action, or one of another device, is not found.
        app.store
            .get_action(&tenant, &req.device_id, &req.action_id)
            .await?;
        let mut ts = app
            .store
            .action_transitions(&tenant, &req.action_id, req.after, req.size + 1)
            .await?;
        let more = ts.len() > req.size as usize;
        ts.truncate(req.size as usize);
        let next = match ts.last() {
            Some(last) if more => encode_token(&req.scope, &last.seq.to_string()),
            _ => String::new(),
        };
        Ok(pb::ListActionHistoryResponse {
            transitions: ts.iter().map(convert::transition_to_proto).collect(),
            next_page_token: next,
        })
    }

    async fn cancel(&self, req: convert::CancelAction) -> Result<pb::Action, Error> {
        let app = &self.0;
        let tenant = app.tenant();
        let ran = app
            .idempotent(
                "CancelAction",
                super::Prework::None,
                &req.idem,
                |a: &Action| convert::action_to_proto(a),
                |commit| async {
                    app.store
                        .cancel_action_once(
                            &tenant,
                            &req.device_id,
                            &req.action_id,
                            req.etag.as_deref(),
                            commit,
                        )
                        .await
                },
            )
            .await?;
        // A cancelled ACTIVE action is reverted now.
        app.wake.now();
        Ok(ran.answer(|a| convert::action_to_proto(&a)))
    }
}

#[tonic::async_trait]
impl ActionService for Actions {
    async fn push_action(
        &self,
        request: Request<pb::PushActionRequest>,
    ) -> Result<Response<pb::PushActionResponse>, Status> {
        let this = Self(self.0.for_call(&request)?);
        let (outcome, dry_run) = match convert::push_action(request.into_inner()) {
            Ok(req) => {
                let dry_run = req.validate_only;
                let span = tracing::Span::current();
                span.record("device_id", req.device_id.as_str());
                let pushed = this.push(req).await;
                if let Ok(r) = &pushed
                    && let Some(a) = &r.action
                {
                    span.record("action_id", a.action_id.as_str());
                }
                (pushed, dry_run)
            }
            Err(e) => (Err(e), false),
        };
        if !dry_run {
            crate::metrics::push(&outcome);
        }
        Ok(Response::new(outcome?))
    }

    async fn get_action(
        &self,
        request: Request<pb::GetActionRequest>,
    ) -> Result<Response<pb::Action>, Status> {
        let this = Self(self.0.for_call(&request)?);
        let (device_id, action_id) = convert::get_action(request.into_inner())?;
        let a = self
            .0
            .store
            .get_action(&this.0.tenant(), &device_id, &action_id)
            .await?;
        Ok(Response::new(convert::action_to_proto(&a)))
    }

    async fn list_actions(
        &self,
        request: Request<pb::ListActionsRequest>,
    ) -> Result<Response<pb::ListActionsResponse>, Status> {
        let this = Self(self.0.for_call(&request)?);
        let req = convert::list_actions(request.into_inner())?;
        Ok(Response::new(this.list(req).await?))
    }

    async fn list_action_history(
        &self,
        request: Request<pb::ListActionHistoryRequest>,
    ) -> Result<Response<pb::ListActionHistoryResponse>, Status> {
        let this = Self(self.0.for_call(&request)?);
        let req = convert::list_action_history(request.into_inner())?;
        Ok(Response::new(this.history(req).await?))
    }

    async fn cancel_action(
        &self,
        request: Request<pb::CancelActionRequest>,
    ) -> Result<Response<pb::Action>, Status> {
        let this = Self(self.0.for_call(&request)?);
        let req = convert::cancel_action(request.into_inner())?;
        Ok(Response::new(this.cancel(req).await?))
    }
}
