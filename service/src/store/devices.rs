//! Devices: create, read, list, update (with the retarget check) and
//! delete.

use super::{IdemCommit, Store, check_etag, db_err, rows};
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
        mut device: Device,
        idem: Option<IdemCommit<Device>>,
    ) -> Result<Device, Error> {
        let mut tx = self.begin().await?;
        let now = self.clock.now();
        device.revision = 1;
        device.created = now;
        device.updated = now;
        device.incarnation = uuid::Uuid::now_v7().simple().to_string();
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM devices WHERE tenant_id = ? AND device_id = ?")
                .bind(tenant.as_str())
                .bind(device.id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_err)?;
        if exists.is_some() {
            return Err(Error::DeviceAlreadyExists {
                device_id: device.id.to_string(),
            });
        }
        rows::insert_device(&mut tx, tenant, &device).await?;
        rows::audit_device(
            &mut tx,
            tenant,
            &device.id,
            "CREATED",
            idem.as_ref().map(|i| i.request_id.as_str()),
            now,
        )
        .await?;
        Self::idem_complete(&mut tx, tenant, idem, &device).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(device)
    }

    /// Whether a device exists (read outside any transaction: a hint to
    /// spare work, the write decides).
    pub async fn device_exists(&self, tenant: &TenantId, id: &DeviceId) -> Result<bool, Error> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM devices WHERE tenant_id = ? AND device_id = ?")
                .bind(tenant.as_str())
                .bind(id.as_str())
                .fetch_optional(&self.read)
                .await
                .map_err(db_err)?;
        Ok(found.is_some())
    }

    /// One device.
    pub async fn get_device(&self, tenant: &TenantId, id: &DeviceId) -> Result<Device, Error> {
        rows::fetch_device(&self.read, tenant, id)
            .await?
            .ok_or_else(|| Error::DeviceNotFound {
                device_id: id.to_string(),
            })
    }

    /// Devices in id order, after `after`.
    pub async fn list_devices(
        &self,
        tenant: &TenantId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Device>, Error> {
        let rs = sqlx::query(
            "SELECT * FROM devices WHERE tenant_id = ? AND device_id > ? ORDER BY device_id LIMIT ?",
        )
        .bind(tenant.as_str())
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(db_err)?;
        rs.iter().map(rows::device_from_row).collect()
    }

    /// Number of devices of the tenant.
    pub async fn count_devices(&self, tenant: &TenantId) -> Result<i64, Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE tenant_id = ?")
            .bind(tenant.as_str())
            .fetch_one(&self.read)
            .await
            .map_err(db_err)
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
        apply: impl FnOnce(&mut Device) -> Result<Retarget, Error>,
        observed: Option<(Device, crate::domain::Observed)>,
        idem: Option<IdemCommit<Device>>,
    ) -> Result<Device, Error> {
        let mut tx = self.begin().await?;
        let now = self.clock.now();
        let mut device = rows::fetch_device(&mut *tx, tenant, id)
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
            let held: Vec<(String,)> = sqlx::query_as(
                "SELECT action_id FROM actions
                 WHERE tenant_id = ? AND device_id = ?
                   AND (driver_memo IS NOT NULL OR state = 'ACTIVE'
                        OR work = 'REVERT' OR lease_owner IS NOT NULL)
                 ORDER BY start_ns, action_id",
            )
            .bind(tenant.as_str())
            .bind(id.as_str())
            .fetch_all(&mut *tx)
            .await
            .map_err(db_err)?;
            let ids: Vec<ActionId> = held
                .iter()
                .filter_map(|(a,)| ActionId::parse(a).ok())
                .collect();
            if !ids.is_empty() {
                return Err(Error::WritesInForce {
                    device_id: id.to_string(),
                    action_ids: ids,
                });
            }
        }
        device.revision += 1;
        device.updated = now;
        device.observed = observed
            .filter(|(seen, _)| seen.same_config(&device))
            .map(|(_, o)| o);
        sqlx::query(
            "UPDATE devices SET display_name = ?, oem_device_id = ?, timezone = ?, settings = ?, revision = ?, update_ns = ?,
               observed = ?, observed_ns = ?
             WHERE tenant_id = ? AND device_id = ?",
        )
        .bind(&device.display_name)
        .bind(&device.oem_device_id)
        .bind(&device.timezone)
        .bind(rows::settings_json(&device.settings))
        .bind(device.revision)
        .bind(now.0)
        .bind(device.observed.as_ref().map(rows::observed_json))
        .bind(device.observed.as_ref().map(|o| o.at.0))
        .bind(tenant.as_str())
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_err)?;
        rows::audit_device(
            &mut tx,
            tenant,
            id,
            "UPDATED",
            idem.as_ref().map(|i| i.request_id.as_str()),
            now,
        )
        .await?;
        Self::idem_complete(&mut tx, tenant, idem, &device).await?;
        tx.commit().await.map_err(db_err)?;
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
        let mut tx = self.begin().await?;
        let now = self.clock.now();
        let device = rows::fetch_device(&mut *tx, tenant, id)
            .await?
            .ok_or_else(|| Error::DeviceNotFound {
                device_id: id.to_string(),
            })?;
        check_etag(etag, &device.etag(), || format!("devices/{id}"))?;
        let holding = rows::holding_actions(
            &mut tx,
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
        let request_id = idem.as_ref().map(|i| i.request_id.clone());
        for c in &cancelled {
            if let Some(t) = &c.transition {
                rows::audit(&mut tx, tenant, t, request_id.as_deref(), now).await?;
            }
        }
        sqlx::query("DELETE FROM devices WHERE tenant_id = ? AND device_id = ?")
            .bind(tenant.as_str())
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db_err)?;
        rows::audit_device(&mut tx, tenant, id, "DELETED", request_id.as_deref(), now).await?;
        Self::idem_complete(&mut tx, tenant, idem, &()).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(())
    }
}
