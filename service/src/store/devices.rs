//! Devices: create, read, list, update (with the retarget check) and
//! delete.

use std::sync::Arc;

use sea_orm::{
    ColumnTrait, DatabaseTransaction, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder,
    QuerySelect,
    sea_query::{Expr, ExprTrait},
};

use super::{
    IdemCommit, IdemRequest, Store, Written, check_etag, db_err,
    entity::{action, device},
    idem::{WriteOp, write_op},
    rows,
};
use crate::domain::{ActionId, Device, DeviceId, Error, TenantId, lifecycle};

/// Whether a device change points its driver at another physical device
/// ([`switchyard_drivers::DriverFactory::target`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retarget {
    /// Same target.
    No,
    /// Another target.
    Yes,
}

impl Store {
    /// Registers a device; `device.revision`, `created` and `updated` are
    /// set here.
    pub async fn create_device(
        &self,
        tenant: &TenantId,
        device: Device,
        idem: Option<IdemCommit<Device>>,
    ) -> Result<Device, Error> {
        let key = device.id.to_string();
        self.write(&key, self.create_op(tenant, device), idem).await
    }

    /// [`Store::create_device`] under `request_id` idempotency: the key
    /// checked, then written with the answer, in the creation's own
    /// savepoint.
    pub async fn create_device_once(
        &self,
        tenant: &TenantId,
        device: Device,
        idem: Option<IdemRequest<Device>>,
    ) -> Result<Written<Device>, Error> {
        let key = device.id.to_string();
        self.write_once(&key, tenant, self.create_op(tenant, device), idem)
            .await
    }

    fn create_op(&self, tenant: &TenantId, device: Device) -> WriteOp<Device> {
        let ctx = Arc::new((self.clone(), tenant.clone(), device));
        write_op(move |tx, idem| {
            let ctx = ctx.clone();
            Box::pin(async move {
                let (store, tenant, device) = &*ctx;
                store.create_in(tx, tenant, device, idem).await
            })
        })
    }

    async fn create_in(
        &self,
        tx: &DatabaseTransaction,
        tenant: &TenantId,
        device: &Device,
        idem: Option<&IdemCommit<Device>>,
    ) -> Result<Device, Error> {
        {
            let now = self.clock.now();
            let mut device = device.clone();
            device.revision = 1;
            device.created = now;
            device.updated = now;
            device.incarnation = uuid::Uuid::now_v7().simple().to_string();
            // A device another replica is creating at this moment has no
            // row to lock yet: the insert itself decides, and the second
            // one writes nothing.
            if !rows::insert_device(tx, tenant, &device).await? {
                return Err(Error::DeviceAlreadyExists {
                    device_id: device.id.to_string(),
                });
            }
            rows::audit_device(
                tx,
                tenant,
                &device.id,
                "CREATED",
                idem.map(|i| i.request_id.as_str()),
                now,
            )
            .await?;
            Self::idem_complete(tx, tenant, idem, &device).await?;
            Ok(device)
        }
    }

    /// Whether a device exists (read outside any transaction: a hint to
    /// spare work, the write decides).
    pub async fn device_exists(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, Error> {
        self.bounded(async {
            let found = device::Entity::find()
                .filter(device::Column::TenantId.eq(tenant.as_str()))
                .filter(device::Column::DeviceId.eq(id.as_str()))
                .count(&self.read)
                .await
                .map_err(db_err)?;
            Ok(found > 0)
        })
        .await
    }

    /// One device.
    pub async fn get_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<Device, Error> {
        self.bounded(async {
            rows::fetch_device(&self.read, tenant, id, false)
                .await?
                .ok_or_else(|| Error::DeviceNotFound {
                    device_id: id.to_string(),
                })
        })
        .await
    }

    /// Devices in id order, after `after`.
    pub async fn list_devices(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Device>, Error> {
        self.bounded(async {
            let select = device::Entity::find()
                .filter(device::Column::TenantId.eq(tenant.as_str()))
                .filter(device::Column::DeviceId.gt(after.unwrap_or("")))
                .order_by_asc(device::Column::DeviceId)
                .limit(u64::from(limit));
            rows::all(&self.read, select)
                .await?
                .into_iter()
                .map(rows::device_from_model)
                .collect()
        })
        .await
    }

    /// Number of devices of the tenant.
    pub async fn count_devices(&self, tenant: &TenantId) -> Result<i64, Error> {
        self.bounded(async {
            let n = device::Entity::find()
                .filter(device::Column::TenantId.eq(tenant.as_str()))
                .count(&self.read)
                .await
                .map_err(db_err)?;
            i64::try_from(n).map_err(|_| Error::Internal("device count out of range".into()))
        })
        .await
    }

    /// Changes a device with `apply`, if `etag` (when given) matches; a
    /// change `apply` says retargets the device is refused while any of its
    /// actions' writes may be in force: a driver memo on record, an apply
    /// in flight or retrying, an ACTIVE action, or a revert owed. What
    /// was observed under the old configuration is dropped; `observed`, a
    /// reading of the configuration `apply` sets up (made before the
    /// transaction, so no OEM call holds the write lock), is kept if the
    /// configuration is still the one it was made for.
    pub async fn update_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        etag: Option<&str>,
        apply: impl Fn(&mut Device) -> Result<Retarget, Error> + Send + Sync + 'static,
        observed: Option<(Device, crate::domain::Observed)>,
        idem: Option<IdemCommit<Device>>,
    ) -> Result<Device, Error> {
        let op = self.update_op(tenant, id, etag, apply, observed);
        self.write(id.as_str(), op, idem).await
    }

    /// [`Store::update_device`] under `request_id` idempotency: the key
    /// checked, then written with the answer, in the change's own
    /// savepoint.
    pub async fn update_device_once(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        etag: Option<&str>,
        apply: impl Fn(&mut Device) -> Result<Retarget, Error> + Send + Sync + 'static,
        observed: Option<(Device, crate::domain::Observed)>,
        idem: Option<IdemRequest<Device>>,
    ) -> Result<Written<Device>, Error> {
        let op = self.update_op(tenant, id, etag, apply, observed);
        self.write_once(id.as_str(), tenant, op, idem).await
    }

    fn update_op(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        etag: Option<&str>,
        apply: impl Fn(&mut Device) -> Result<Retarget, Error> + Send + Sync + 'static,
        observed: Option<(Device, crate::domain::Observed)>,
    ) -> WriteOp<Device> {
        let ctx = Arc::new((
            self.clone(),
            tenant.clone(),
            id.clone(),
            etag.map(str::to_owned),
            apply,
            observed,
        ));
        write_op(move |tx, idem| {
            let ctx = ctx.clone();
            Box::pin(async move {
                let (store, tenant, id, etag, apply, observed) = &*ctx;
                store
                    .update_in(
                        tx,
                        tenant,
                        id,
                        etag.as_deref(),
                        apply,
                        observed.as_ref(),
                        idem,
                    )
                    .await
            })
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn update_in(
        &self,
        tx: &DatabaseTransaction,
        tenant: &TenantId,
        id: &DeviceId,
        etag: Option<&str>,
        apply: &impl Fn(&mut Device) -> Result<Retarget, Error>,
        observed: Option<&(Device, crate::domain::Observed)>,
        idem: Option<&IdemCommit<Device>>,
    ) -> Result<Device, Error> {
        let now = self.clock.now();
        let mut device = rows::fetch_device(tx, tenant, id, true)
            .await?
            .ok_or_else(|| Error::DeviceNotFound {
                device_id: id.to_string(),
            })?;
        check_etag(etag, &device.etag(), || format!("devices/{id}"))?;
        if apply(&mut device)? == Retarget::Yes {
            // A revert owed under the old target could not reach the
            // device under the new one.
            // A memo on record (a write that may be in force), an apply in
            // flight (a dispatch lease), an ACTIVE action (one applied
            // before memos existed has none), or a revert owed. An apply
            // waiting to be retried that never wrote does not count.
            // Locked (PostgreSQL): also every row that owes work, so a
            // dispatch claim either took its row before this (and the row
            // is seen leased) or skips it until this change is committed
            // (and then dispatches under the new target).
            let rows = rows::all(
                tx,
                rows::actions_of(tenant)
                    .filter(action::Column::DeviceId.eq(id.as_str()))
                    .filter(
                        action::Column::DriverMemo
                            .is_not_null()
                            .or(action::Column::State
                                .eq(crate::domain::ActionState::Active.as_str()))
                            .or(Expr::cust("work <> 'NONE'"))
                            .or(action::Column::LeaseOwner.is_not_null()),
                    )
                    .order_by_asc(action::Column::StartNs)
                    .order_by_asc(action::Column::ActionId)
                    .lock_exclusive(),
            )
            .await?;
            let revert = crate::domain::Work::Revert.as_str();
            let scheduled = crate::domain::ActionState::Scheduled.as_str();
            // Work a dispatcher claimed ahead of its start and has not
            // started gives way: its claim is let go below, and it is
            // dispatched under the new target.
            let ahead = |a: &action::Model| {
                a.lease_owner.is_some()
                    && a.driver_memo.is_none()
                    && (a.state == scheduled
                        || a.due_ns
                            .is_some_and(|d| d > now.0.saturating_add(super::CLOCK_SKEW_NANOS)))
            };
            let ids: Vec<ActionId> = rows
                .iter()
                .filter(|a| {
                    a.driver_memo.is_some()
                        || a.state == crate::domain::ActionState::Active.as_str()
                        || a.work == revert
                        || (a.lease_owner.is_some() && !ahead(a))
                })
                .map(|a| {
                    ActionId::parse(&a.action_id)
                        .map_err(|_| Error::Internal("stored row has an invalid action_id".into()))
                })
                .collect::<Result<_, _>>()?;
            if !ids.is_empty() {
                return Err(Error::WritesInForce {
                    device_id: id.to_string(),
                    action_ids: ids,
                });
            }
        }
        // Any change of the device lets go of work claimed ahead of its
        // start: a dispatcher runs a job with the device as claimed, so
        // the work is claimed again, with the device as it is now (a
        // start that won the race runs with the device as it was, as a
        // call in flight does). The device's owed rows are locked first
        // (PostgreSQL), so a claim taken meanwhile skips them until this
        // change is committed, and then reads the device as changed.
        let _owed: Vec<String> = rows::actions_of(tenant)
            .select_only()
            .column(action::Column::ActionId)
            .filter(action::Column::DeviceId.eq(id.as_str()))
            .filter(Expr::cust("work <> 'NONE'"))
            .order_by_asc(action::Column::StartNs)
            .order_by_asc(action::Column::ActionId)
            .lock_exclusive()
            .into_tuple()
            .all(tx)
            .await
            .map_err(db_err)?;
        rows::release_claims()
            .filter(action::Column::TenantId.eq(tenant.as_str()))
            .filter(action::Column::DeviceId.eq(id.as_str()))
            .filter(action::Column::LeaseOwner.is_not_null())
            .filter(
                action::Column::State
                    .eq(crate::domain::ActionState::Scheduled.as_str())
                    .or(action::Column::DueNs.gt(now.0.saturating_add(super::CLOCK_SKEW_NANOS))),
            )
            .exec(tx)
            .await
            .map_err(db_err)?;
        device.revision += 1;
        device.updated = now;
        device.observed = observed
            .filter(|(seen, _)| seen.same_config(&device))
            .map(|(_, o)| o.clone());
        device::Entity::update_many()
            .col_expr(
                device::Column::DisplayName,
                Expr::value(device.display_name.clone()),
            )
            .col_expr(
                device::Column::OemDeviceId,
                Expr::value(device.oem_device_id.clone()),
            )
            .col_expr(
                device::Column::Timezone,
                Expr::value(device.timezone.clone()),
            )
            .col_expr(
                device::Column::Settings,
                Expr::value(rows::settings_json(&device.settings)),
            )
            .col_expr(device::Column::Revision, Expr::value(device.revision))
            .col_expr(device::Column::UpdateNs, Expr::value(now.0))
            .col_expr(
                device::Column::Observed,
                Expr::value(device.observed.as_ref().map(rows::observed_json)),
            )
            .col_expr(
                device::Column::ObservedNs,
                Expr::value(device.observed.as_ref().map(|o| o.at.0)),
            )
            .filter(device::Column::TenantId.eq(tenant.as_str()))
            .filter(device::Column::DeviceId.eq(id.as_str()))
            .exec(tx)
            .await
            .map_err(db_err)?;
        rows::audit_device(
            tx,
            tenant,
            id,
            "UPDATED",
            idem.map(|i| i.request_id.as_str()),
            now,
        )
        .await?;
        Self::idem_complete(tx, tenant, idem, &device).await?;
        Ok(device)
    }

    /// Deletes a device and its actions. Refused while actions hold a
    /// channel, unless `force` (which cancels the SCHEDULED ones); in-flight
    /// actions, and cancelled ones whose revert is still owed, always block.
    pub async fn delete_device(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        etag: Option<&str>,
        force: bool,
        idem: Option<IdemCommit<()>>,
    ) -> Result<(), Error> {
        let op = self.delete_op(tenant, id, etag, force);
        self.write(id.as_str(), op, idem).await
    }

    /// [`Store::delete_device`] under `request_id` idempotency: the key
    /// checked, then written with the answer, in the deletion's own
    /// savepoint.
    pub async fn delete_device_once(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        etag: Option<&str>,
        force: bool,
        idem: Option<IdemRequest<()>>,
    ) -> Result<Written<()>, Error> {
        let op = self.delete_op(tenant, id, etag, force);
        self.write_once(id.as_str(), tenant, op, idem).await
    }

    fn delete_op(
        &self,
        tenant: &TenantId,
        id: &DeviceId,
        etag: Option<&str>,
        force: bool,
    ) -> WriteOp<()> {
        let ctx = Arc::new((
            self.clone(),
            tenant.clone(),
            id.clone(),
            etag.map(str::to_owned),
        ));
        write_op(move |tx, idem| {
            let ctx = ctx.clone();
            Box::pin(async move {
                let (store, tenant, id, etag) = &*ctx;
                store
                    .delete_in(tx, tenant, id, etag.as_deref(), force, idem)
                    .await
            })
        })
    }

    async fn delete_in(
        &self,
        tx: &DatabaseTransaction,
        tenant: &TenantId,
        id: &DeviceId,
        etag: Option<&str>,
        force: bool,
        idem: Option<&IdemCommit<()>>,
    ) -> Result<(), Error> {
        let now = self.clock.now();
        let device = rows::fetch_device(tx, tenant, id, true)
            .await?
            .ok_or_else(|| Error::DeviceNotFound {
                device_id: id.to_string(),
            })?;
        check_etag(etag, &device.etag(), || format!("devices/{id}"))?;
        let holding = rows::holding_actions(
            tx,
            tenant,
            id,
            rows::HoldingFilter {
                channel: None,
                ending_after: None,
            },
        )
        .await?;
        // The actions go with the device (their rows are deleted below);
        // their cancellations stay in the audit trail.
        let cancelled = lifecycle::delete_device(id, &holding, force, now)?;
        let request_id = idem.map(|i| i.request_id.clone());
        for c in &cancelled {
            if let Some(t) = &c.transition {
                rows::audit(tx, tenant, t, request_id.as_deref(), now).await?;
            }
        }
        device::Entity::delete_many()
            .filter(device::Column::TenantId.eq(tenant.as_str()))
            .filter(device::Column::DeviceId.eq(id.as_str()))
            .exec(tx)
            .await
            .map_err(db_err)?;
        rows::audit_device(tx, tenant, id, "DELETED", request_id.as_deref(), now).await?;
        Self::idem_complete(tx, tenant, idem, &()).await?;
        Ok(())
    }
}
