//! Tenants and their API keys (migration 12, docs/security.md). Short
//! transactions of their own, outside the group-commit lanes: they are
//! rare (an operator's command, a key's first use in a minute), and the
//! auth layer reads keys on the read pool.

use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::OnConflict,
};

use super::{
    Store, db_err,
    entity::{api_key, tenant},
    rows,
};
use crate::domain::{Error, TenantId, Ts};

/// A tenant as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantRecord {
    pub id: TenantId,
    pub name: String,
    pub created: Ts,
    /// Per-key rate and burst; `None`: the server's defaults.
    pub rate_per_second: Option<u32>,
    pub rate_burst: Option<u32>,
}

/// An API key as stored: its SHA-256, never the key. Its `Debug` leaves
/// the hash out.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub key_id: String,
    pub tenant: TenantId,
    pub hash: Vec<u8>,
    pub scopes: Vec<String>,
    pub description: String,
    pub created: Ts,
    pub expires: Option<Ts>,
    pub revoked: Option<Ts>,
    pub last_used: Option<Ts>,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("key_id", &self.key_id)
            .field("tenant", &self.tenant)
            .field("scopes", &self.scopes)
            .field("created", &self.created)
            .field("expires", &self.expires)
            .field("revoked", &self.revoked)
            .finish_non_exhaustive()
    }
}

fn rate(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok()).filter(|v| *v > 0)
}

fn tenant_record(m: tenant::Model) -> TenantRecord {
    TenantRecord {
        id: TenantId::from_stored(m.tenant_id),
        name: m.name,
        created: Ts(m.created_ns),
        rate_per_second: rate(m.rate_per_second),
        rate_burst: rate(m.rate_burst),
    }
}

fn key_record(m: api_key::Model) -> KeyRecord {
    KeyRecord {
        key_id: m.key_id,
        tenant: TenantId::from_stored(m.tenant_id),
        hash: m.key_hash,
        scopes: m
            .scopes
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        description: m.description,
        created: Ts(m.created_ns),
        expires: m.expires_ns.map(Ts),
        revoked: m.revoked_ns.map(Ts),
        last_used: m.last_used_ns.map(Ts),
    }
}

impl Store {
    /// Creates a tenant; TENANT_ALREADY_EXISTS when the name is taken.
    pub async fn create_tenant(&self, t: &TenantRecord) -> Result<(), Error> {
        let row = tenant::ActiveModel {
            tenant_id: Set(t.id.as_str().to_owned()),
            name: Set(t.name.clone()),
            created_ns: Set(t.created.0),
            rate_per_second: Set(t.rate_per_second.map(i64::from)),
            rate_burst: Set(t.rate_burst.map(i64::from)),
        };
        let written = self
            .retrying(|| async {
                let tx = self.begin().await?;
                let n = tenant::Entity::insert(row.clone())
                    .on_conflict(OnConflict::new().do_nothing().to_owned())
                    .exec_without_returning(&tx)
                    .await
                    .map_err(db_err)?;
                tx.commit().await.map_err(db_err)?;
                Ok(n)
            })
            .await?;
        if written == 1 {
            Ok(())
        } else {
            Err(Error::TenantAlreadyExists {
                tenant: t.name.clone(),
            })
        }
    }

    /// Sets a tenant's per-key rate and burst (`None`: the defaults).
    pub async fn set_tenant_rate(
        &self,
        id: &TenantId,
        per_second: Option<u32>,
        burst: Option<u32>,
    ) -> Result<(), Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            tenant::Entity::update_many()
                .col_expr(
                    tenant::Column::RatePerSecond,
                    sea_orm::sea_query::Expr::value(per_second.map(i64::from)),
                )
                .col_expr(
                    tenant::Column::RateBurst,
                    sea_orm::sea_query::Expr::value(burst.map(i64::from)),
                )
                .filter(tenant::Column::TenantId.eq(id.as_str()))
                .exec(&tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)
        })
        .await
    }

    /// Every tenant, by name.
    pub async fn list_tenants(&self) -> Result<Vec<TenantRecord>, Error> {
        let rows = rows::all(
            &self.read,
            tenant::Entity::find().order_by_asc(tenant::Column::Name),
        )
        .await?;
        Ok(rows.into_iter().map(tenant_record).collect())
    }

    /// The tenant of that name, if any.
    pub async fn tenant_by_name(&self, name: &str) -> Result<Option<TenantRecord>, Error> {
        let row = rows::first(
            &self.read,
            tenant::Entity::find().filter(tenant::Column::Name.eq(name)),
        )
        .await?;
        Ok(row.map(tenant_record))
    }

    /// The tenant of that id, if any.
    pub async fn tenant_by_id(&self, id: &TenantId) -> Result<Option<TenantRecord>, Error> {
        let row = rows::first(
            &self.read,
            tenant::Entity::find().filter(tenant::Column::TenantId.eq(id.as_str())),
        )
        .await?;
        Ok(row.map(tenant_record))
    }

    /// Stores a new key (its hash).
    pub async fn create_key(&self, k: &KeyRecord) -> Result<(), Error> {
        let row = api_key::ActiveModel {
            key_id: Set(k.key_id.clone()),
            tenant_id: Set(k.tenant.as_str().to_owned()),
            key_hash: Set(k.hash.clone()),
            scopes: Set(k.scopes.join(",")),
            description: Set(k.description.clone()),
            created_ns: Set(k.created.0),
            expires_ns: Set(k.expires.map(|t| t.0)),
            revoked_ns: Set(None),
            last_used_ns: Set(None),
        };
        self.retrying(|| async {
            let tx = self.begin().await?;
            api_key::Entity::insert(row.clone())
                .exec_without_returning(&tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)
        })
        .await
    }

    /// A tenant's keys, oldest first.
    pub async fn list_keys(&self, tenant: &TenantId) -> Result<Vec<KeyRecord>, Error> {
        let rows = rows::all(
            &self.read,
            api_key::Entity::find()
                .filter(api_key::Column::TenantId.eq(tenant.as_str()))
                .order_by_asc(api_key::Column::CreatedNs)
                .order_by_asc(api_key::Column::KeyId),
        )
        .await?;
        Ok(rows.into_iter().map(key_record).collect())
    }

    /// The key of that id, if any (the auth layer's lookup).
    pub async fn key_by_id(&self, key_id: &str) -> Result<Option<KeyRecord>, Error> {
        let row = rows::first(
            &self.read,
            api_key::Entity::find().filter(api_key::Column::KeyId.eq(key_id)),
        )
        .await?;
        Ok(row.map(key_record))
    }

    /// Every key id (revoked ones too): what the auth layer looks up.
    pub async fn key_ids(&self) -> Result<Vec<String>, Error> {
        self.bounded(async {
            api_key::Entity::find()
                .select_only()
                .column(api_key::Column::KeyId)
                .into_tuple()
                .all(&self.read)
                .await
                .map_err(db_err)
        })
        .await
    }

    /// Whether any key was ever created (revoked ones count): until one
    /// is, a server on loopback runs without auth.
    pub async fn any_key(&self) -> Result<bool, Error> {
        let row: Option<String> = api_key::Entity::find()
            .select_only()
            .column(api_key::Column::KeyId)
            .limit(1)
            .into_tuple()
            .one(&self.read)
            .await
            .map_err(db_err)?;
        Ok(row.is_some())
    }

    /// Revokes the key `key_id` of `tenant` (any tenant's with `None`) at
    /// `now`, unless it already is; the key as it then stands, or `None`
    /// if there is no such key (of that tenant).
    pub async fn revoke_key(
        &self,
        key_id: &str,
        tenant: Option<&TenantId>,
        now: Ts,
    ) -> Result<Option<KeyRecord>, Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            let mut update = api_key::Entity::update_many()
                .col_expr(
                    api_key::Column::RevokedNs,
                    sea_orm::sea_query::Expr::value(now.0),
                )
                .filter(api_key::Column::KeyId.eq(key_id))
                .filter(api_key::Column::RevokedNs.is_null());
            if let Some(t) = tenant {
                update = update.filter(api_key::Column::TenantId.eq(t.as_str()));
            }
            update.exec(&tx).await.map_err(db_err)?;
            let mut find = api_key::Entity::find().filter(api_key::Column::KeyId.eq(key_id));
            if let Some(t) = tenant {
                find = find.filter(api_key::Column::TenantId.eq(t.as_str()));
            }
            let row = rows::first(&tx, find).await?;
            tx.commit().await.map_err(db_err)?;
            Ok(row.map(key_record))
        })
        .await
    }

    /// Records that `key_id` was used at `now` (the auth layer calls it
    /// at most once a minute per key, off the request's path).
    pub async fn touch_key(&self, key_id: &str, now: Ts) -> Result<(), Error> {
        self.retrying(|| async {
            let tx = self.begin().await?;
            api_key::Entity::update_many()
                .col_expr(
                    api_key::Column::LastUsedNs,
                    sea_orm::sea_query::Expr::value(now.0),
                )
                .filter(api_key::Column::KeyId.eq(key_id))
                .exec(&tx)
                .await
                .map_err(db_err)?;
            tx.commit().await.map_err(db_err)
        })
        .await
    }
}
