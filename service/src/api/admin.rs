//! AdminService: tenants and API keys over gRPC (scope `admin`), and the
//! operations the command line shares (`switchyard admin ...`).
//!
//! An admin key of the operator's tenant (`default`) manages every
//! tenant; one of any other tenant manages only its own tenant's keys,
//! and another tenant or key is NOT_FOUND to it, as if it did not exist.

use std::time::Duration;

use switchyard_proto::v1::{self as pb, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use super::{App, convert::ts_to_proto};
use crate::{
    auth::{self, Caller, Scope},
    domain::{Clock, Error, Reason, TenantId, Ts},
    store::{KeyRecord, Store, TenantRecord},
};

/// Longest key description, in bytes.
pub const MAX_DESCRIPTION_BYTES: usize = 256;
/// Largest per-key rate or burst a tenant may be given.
pub const MAX_RATE: u32 = 1_000_000;
/// Longest key lifetime.
pub const MAX_EXPIRES_IN: Duration = Duration::from_secs(10 * 366 * 86_400);

/// Checks a tenant name: 1 to 63 lower-case letters, digits, '-' or '_'.
pub fn check_tenant_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            Reason::InvalidField,
            "a tenant name is 1 to 63 lower-case letters, digits, '-' or '_'",
        ))
    }
}

/// Creates a tenant named `name` with per-key rates (`None`: defaults).
pub async fn create_tenant(
    store: &Store,
    clock: &dyn Clock,
    name: &str,
    rate_per_second: Option<u32>,
    rate_burst: Option<u32>,
) -> Result<TenantRecord, Error> {
    check_tenant_name(name)?;
    for (field, v) in [
        ("rate_per_second", rate_per_second),
        ("rate_burst", rate_burst),
    ] {
        if v.is_some_and(|v| v > MAX_RATE) {
            return Err(Error::invalid(
                field,
                Reason::InvalidField,
                format!("at most {MAX_RATE} (0: the server's default)"),
            ));
        }
    }
    let t = TenantRecord {
        id: auth::new_tenant_id()?,
        name: name.to_owned(),
        created: clock.now(),
        rate_per_second: rate_per_second.filter(|r| *r > 0),
        rate_burst: rate_burst.filter(|r| *r > 0),
    };
    store.create_tenant(&t).await?;
    Ok(t)
}

/// Creates a key for `tenant`; returns it as stored and the key itself
/// (shown once).
pub async fn create_key(
    store: &Store,
    clock: &dyn Clock,
    tenant: &TenantRecord,
    scopes: &[Scope],
    expires_in: Option<Duration>,
    description: &str,
) -> Result<(KeyRecord, String), Error> {
    if scopes.is_empty() {
        return Err(Error::invalid(
            "scopes",
            Reason::MissingField,
            "at least one scope is needed",
        ));
    }
    if description.len() > MAX_DESCRIPTION_BYTES || description.chars().any(char::is_control) {
        return Err(Error::invalid(
            "description",
            Reason::InvalidField,
            format!("at most {MAX_DESCRIPTION_BYTES} bytes of text, without control characters"),
        ));
    }
    let now = clock.now();
    let expires = match expires_in {
        None => None,
        Some(d) if d.is_zero() || d > MAX_EXPIRES_IN => {
            return Err(Error::invalid(
                "expires_in",
                Reason::InvalidField,
                "must be positive and at most 10 years",
            ));
        }
        Some(d) => Some(now.plus_nanos(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))),
    };
    let new = auth::generate_key()?;
    let record = KeyRecord {
        key_id: new.key_id,
        tenant: tenant.id.clone(),
        hash: new.hash,
        scopes: scopes.iter().map(|s| s.as_str().to_owned()).collect(),
        description: description.to_owned(),
        created: now,
        expires,
        revoked: None,
        last_used: None,
    };
    store.create_key(&record).await?;
    Ok((record, new.key))
}

/// The proto of a tenant.
pub fn tenant_to_proto(t: &TenantRecord) -> pb::Tenant {
    pb::Tenant {
        tenant_id: t.id.as_str().to_owned(),
        name: t.name.clone(),
        create_time: Some(ts_to_proto(t.created)),
        rate_per_second: t.rate_per_second.unwrap_or(0),
        rate_burst: t.rate_burst.unwrap_or(0),
    }
}

/// The proto of a key (never its secret: the record has only its hash).
pub fn key_to_proto(k: &KeyRecord, tenant_name: &str) -> pb::ApiKey {
    pb::ApiKey {
        key_id: k.key_id.clone(),
        tenant: tenant_name.to_owned(),
        scopes: k.scopes.clone(),
        description: k.description.clone(),
        create_time: Some(ts_to_proto(k.created)),
        expire_time: k.expires.map(ts_to_proto),
        last_use_time: k.last_used.map(ts_to_proto),
        revoke_time: k.revoked.map(ts_to_proto),
    }
}

/// Implements `switchyard.v1.AdminService`.
#[derive(Clone, Debug)]
pub struct Admin(pub App);

impl Admin {
    fn operator_only(caller: &Caller, method: &str) -> Result<(), Error> {
        if caller.is_operator() {
            Ok(())
        } else {
            Err(Error::OperatorOnly {
                method: format!("switchyard.v1.AdminService/{method}"),
            })
        }
    }

    /// The tenant a request names (empty: the caller's own), as the
    /// caller may see it.
    async fn tenant(&self, caller: &Caller, name: &str) -> Result<TenantRecord, Error> {
        let store = &self.0.store;
        let not_found = || Error::TenantNotFound {
            tenant: name.to_owned(),
        };
        if name.is_empty() {
            return store
                .tenant_by_id(&caller.tenant)
                .await?
                .ok_or_else(|| Error::Internal("the caller's tenant is gone".into()));
        }
        check_tenant_name(name).map_err(|_| {
            Error::invalid(
                "tenant",
                Reason::InvalidField,
                "a tenant name is 1 to 63 lower-case letters, digits, '-' or '_'",
            )
        })?;
        let t = store.tenant_by_name(name).await?.ok_or_else(not_found)?;
        if caller.is_operator() || t.id == caller.tenant {
            Ok(t)
        } else {
            Err(not_found())
        }
    }

    async fn tenant_name(&self, id: &TenantId) -> Result<String, Error> {
        Ok(self
            .0
            .store
            .tenant_by_id(id)
            .await?
            .map(|t| t.name)
            .unwrap_or_default())
    }
}

fn caller_of<T>(app: &App, request: &Request<T>) -> Result<Caller, Status> {
    Ok(app.for_call(request)?.caller)
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn create_tenant(
        &self,
        request: Request<pb::CreateTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let caller = caller_of(&self.0, &request)?;
        Self::operator_only(&caller, "CreateTenant")?;
        let r = request.into_inner();
        let t = create_tenant(
            &self.0.store,
            self.0.clock.as_ref(),
            &r.name,
            Some(r.rate_per_second),
            Some(r.rate_burst),
        )
        .await?;
        tracing::info!(tenant = %t.name, tenant_id = t.id.as_str(), "tenant created");
        Ok(Response::new(tenant_to_proto(&t)))
    }

    async fn list_tenants(
        &self,
        request: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        let caller = caller_of(&self.0, &request)?;
        Self::operator_only(&caller, "ListTenants")?;
        let ts = self.0.store.list_tenants().await?;
        Ok(Response::new(pb::ListTenantsResponse {
            tenants: ts.iter().map(tenant_to_proto).collect(),
        }))
    }

    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = caller_of(&self.0, &request)?;
        let r = request.into_inner();
        let tenant = self.tenant(&caller, &r.tenant).await?;
        let scopes = Scope::parse_list(r.scopes.iter().map(String::as_str))
            .map_err(|e| Error::invalid("scopes", Reason::InvalidField, e))?;
        let expires_in = match r.expires_in {
            None => None,
            Some(d) if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) => {
                return Err(Error::invalid(
                    "expires_in",
                    Reason::InvalidField,
                    "must be positive and at most 10 years",
                )
                .into());
            }
            Some(d) => Some(
                Duration::from_secs(u64::try_from(d.seconds).unwrap_or(u64::MAX))
                    .saturating_add(Duration::from_nanos(u64::try_from(d.nanos).unwrap_or(0))),
            ),
        };
        let (record, key) = create_key(
            &self.0.store,
            self.0.clock.as_ref(),
            &tenant,
            &scopes,
            expires_in,
            &r.description,
        )
        .await?;
        tracing::info!(
            tenant = %tenant.name,
            key_id = record.key_id,
            scopes = record.scopes.join(","),
            by = caller.key_id.as_deref().unwrap_or("local"),
            "API key created"
        );
        Ok(Response::new(pb::CreateApiKeyResponse {
            api_key: Some(key_to_proto(&record, &tenant.name)),
            key,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = caller_of(&self.0, &request)?;
        let r = request.into_inner();
        let tenant = self.tenant(&caller, &r.tenant).await?;
        let keys = self.0.store.list_keys(&tenant.id).await?;
        Ok(Response::new(pb::ListApiKeysResponse {
            api_keys: keys.iter().map(|k| key_to_proto(k, &tenant.name)).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        let caller = caller_of(&self.0, &request)?;
        let r = request.into_inner();
        if !auth::is_key_id(&r.key_id) {
            return Err(Error::invalid(
                "key_id",
                Reason::InvalidField,
                "a key id is the 16 characters after `sy_` in the key",
            )
            .into());
        }
        let scope = (!caller.is_operator()).then_some(&caller.tenant);
        let now: Ts = self.0.clock.now();
        let Some(k) = self.0.store.revoke_key(&r.key_id, scope, now).await? else {
            return Err(Error::ApiKeyNotFound { key_id: r.key_id }.into());
        };
        tracing::info!(
            key_id = k.key_id,
            by = caller.key_id.as_deref().unwrap_or("local"),
            "API key revoked"
        );
        let name = self.tenant_name(&k.tenant).await?;
        Ok(Response::new(key_to_proto(&k, &name)))
    }
}
