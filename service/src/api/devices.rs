//! DeviceService: parse the request, delegate to the store, convert back.

use switchyard_drivers::ConfigError;
use switchyard_proto::v1::{self as pb, device_service_server::DeviceService};
use tonic::{Request, Response, Status};

use super::{App, convert, encode_token};
use crate::domain::{Device, Error, FieldViolation, Reason, device::valid_timezone};

const MAX_SETTINGS: usize = 64;
const MAX_SETTING_KEY: usize = 64;
const MAX_SETTING_VALUE: usize = 2048;

/// Implements `switchyard.v1.DeviceService`.
#[derive(Clone, Debug)]
pub struct Devices(pub App);

/// The request field a driver's complaint is about. Settings keys that are
/// plain names are addressed as `device.settings.KEY`, others quoted.
fn config_field(e: &ConfigError) -> (String, Reason) {
    match e {
        ConfigError::UnsupportedFamily(_) => ("device.family".to_owned(), Reason::InvalidField),
        ConfigError::InvalidDeviceField { field, .. } => {
            (format!("device.{field}"), Reason::InvalidField)
        }
        ConfigError::UnknownSetting { key, .. } | ConfigError::InvalidSetting { key, .. } => {
            let plain =
                !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let field = if plain {
                format!("device.settings.{key}")
            } else {
                format!("device.settings[{key:?}]")
            };
            (field, Reason::InvalidSettings)
        }
    }
}

/// Checks a device and its driver settings; every problem is reported.
fn check_device(app: &App, d: &Device, out: &mut Vec<FieldViolation>) {
    if !valid_timezone(&d.timezone) {
        out.push(FieldViolation::new(
            "device.timezone",
            Reason::InvalidField,
            "timezone must be an IANA time zone name such as Europe/London",
        ));
    }
    if d.settings.len() > MAX_SETTINGS {
        out.push(FieldViolation::new(
            "device.settings",
            Reason::InvalidField,
            format!("at most {MAX_SETTINGS} settings"),
        ));
        return;
    }
    // Keys are names (they are repeated in errors and field paths); a
    // key with other characters is refused as one problem, not per key.
    let name = |k: &String| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    if !d.settings.keys().all(name) {
        out.push(FieldViolation::new(
            "device.settings",
            Reason::InvalidField,
            "setting keys are names: letters, digits, '_', '-' and '.'",
        ));
        return;
    }
    if d.settings
        .iter()
        .any(|(k, v)| k.len() > MAX_SETTING_KEY || v.len() > MAX_SETTING_VALUE)
    {
        out.push(FieldViolation::new(
            "device.settings",
            Reason::InvalidField,
            format!(
                "setting keys are at most {MAX_SETTING_KEY} bytes and values at most {MAX_SETTING_VALUE}"
            ),
        ));
        return;
    }
    // The operator's secrets are shared by the server, not by its tenants:
    // a tenant's device names only those the operator provided for it.
    for (key, value) in d.settings.iter() {
        if !secret_allowed(&app.caller, value) {
            let (field, reason) = config_field(&ConfigError::InvalidSetting {
                key: key.clone(),
                reason: String::new(),
            });
            out.push(FieldViolation::new(
                field,
                reason,
                format!(
                    "must name a secret the operator provided for this tenant: file:{}.<name> in the secrets directory",
                    app.caller.tenant.as_str()
                ),
            ));
            return;
        }
    }
    let Some(factory) = app.registry.get(&d.driver) else {
        // On create the caller reports UNKNOWN_DRIVER. After create the
        // driver is immutable: a device whose driver this build no longer
        // has keeps working for reads and has no capabilities.
        return;
    };
    for e in factory.validate(&d.spec()) {
        let (field, reason) = config_field(&e);
        // The timezone was reported above already.
        if field == "device.timezone" && out.iter().any(|v| v.field == field) {
            continue;
        }
        // The field names the setting; the family needs the driver named.
        let description = match e {
            ConfigError::UnsupportedFamily(_) => format!("the {:?} {e}", d.driver),
            _ => e.to_string(),
        };
        out.push(FieldViolation::new(field, reason, description));
    }
}

impl Devices {
    fn to_proto(&self, d: &Device) -> pb::Device {
        convert::device_to_proto(d, self.0.capabilities(d).as_ref())
    }

    async fn create(&self, req: convert::CreateDevice) -> Result<pb::Device, Error> {
        let app = &self.0;
        let convert::CreateDevice {
            device,
            mut violations,
            idem,
        } = req;
        if !device.driver.is_empty() && app.registry.get(&device.driver).is_none() {
            violations.push(FieldViolation::new(
                "device.driver",
                Reason::UnknownDriver,
                format!(
                    "no driver {:?}; available: {}",
                    device.driver.chars().take(64).collect::<String>(),
                    app.registry.kinds().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if violations.is_empty() {
            check_device(app, &device, &mut violations);
        }
        if !violations.is_empty() {
            return Err(Error::Invalid(violations));
        }
        let this = self.clone();
        let tenant = app.tenant();
        let ran = app
            .idempotent(
                "CreateDevice",
                super::Prework::ReadsAndOemCalls,
                &idem,
                move |d: &Device| this.to_proto(d),
                |commit| async {
                    // Read before it is stored (no OEM call under the write
                    // lock), so that the answer, its replay and the first
                    // push all see the device's native scheduler.
                    // A device that exists is refused before any OEM call.
                    if app.store.device_exists(&tenant, &device.id).await? {
                        return Err(Error::DeviceAlreadyExists {
                            device_id: device.id.to_string(),
                        });
                    }
                    let mut device = device;
                    device.observed = app.observe(&device).await;
                    app.store.create_device_once(&tenant, device, commit).await
                },
            )
            .await?;
        // A new device owes the dispatcher nothing: no wake (each would
        // cost a claim transaction on the single writer).
        Ok(ran.answer(|d| self.to_proto(&d)))
    }

    async fn update(&self, req: convert::UpdateDevice) -> Result<pb::Device, Error> {
        let app = &self.0;
        let this = self.clone();
        let tenant = app.tenant();
        let ran = app
            .idempotent(
                "UpdateDevice",
                super::Prework::ReadsAndOemCalls,
                &req.idem,
                move |d: &Device| this.to_proto(d),
                |commit| async {
                    // The new configuration is read before the update's
                    // transaction; the store keeps the reading only if the
                    // configuration it commits is the one read.
                    // A change that is refused anyway (stale etag, bad
                    // settings) makes no OEM call; one that leaves the
                    // configuration as it was keeps what was observed.
                    let current = app.store.get_device(&tenant, &req.id).await?;
                    if let Some(given) = &req.etag
                        && *given != current.etag()
                    {
                        return Err(Error::EtagMismatch {
                            resource: format!("devices/{}", req.id),
                            current: current.etag(),
                        });
                    }
                    let mut next = current.clone();
                    req.apply_to(&mut next);
                    let observed = if next.same_config(&current) {
                        current.observed.clone().map(|o| (next, o))
                    } else {
                        match checked(app, &next) {
                            Ok(()) => app.observe(&next).await.map(|o| (next, o)),
                            Err(_) => None,
                        }
                    };
                    // Run by the store's writer: owns what it uses.
                    let (app2, req2) = (app.clone(), req.clone());
                    app.store
                        .update_device_once(
                            &tenant,
                            &req.id,
                            req.etag.as_deref(),
                            move |d| {
                                let target = |d: &Device| {
                                    app2.registry.get(&d.driver).map(|f| f.target(&d.spec()))
                                };
                                let before = target(d);
                                req2.apply_to(d);
                                checked(&app2, d)?;
                                Ok(if before == target(d) {
                                    crate::store::Retarget::No
                                } else {
                                    crate::store::Retarget::Yes
                                })
                            },
                            observed,
                            commit,
                        )
                        .await
                },
            )
            .await?;
        app.wake.now();
        Ok(ran.answer(|d| self.to_proto(&d)))
    }

    async fn list(&self, page: convert::Page) -> Result<pb::ListDevicesResponse, Error> {
        let mut ds = self
            .0
            .store
            .list_devices(&self.0.tenant(), page.after.as_deref(), page.size + 1)
            .await?;
        let more = ds.len() > page.size as usize;
        ds.truncate(page.size as usize);
        let next = match ds.last() {
            Some(last) if more => encode_token("devices", last.id.as_str()),
            _ => String::new(),
        };
        Ok(pb::ListDevicesResponse {
            devices: ds.iter().map(|d| self.to_proto(d)).collect(),
            next_page_token: next,
        })
    }

    async fn delete(&self, req: convert::DeleteDevice) -> Result<(), Error> {
        let app = &self.0;
        let tenant = app.tenant();
        app.idempotent(
            "DeleteDevice",
            super::Prework::None,
            &req.idem,
            |_: &()| (),
            |commit| async {
                app.store
                    .delete_device_once(&tenant, &req.id, req.etag.as_deref(), req.force, commit)
                    .await
            },
        )
        .await
        .map(|_| ())
    }
}

/// Whether a setting's value, if it names a secret (`env:` or `file:`),
/// names one `caller`'s tenant may use: the operator's tenant (`default`)
/// any the operator provided; another tenant only files of the secrets
/// directory named `<tenant id>.<name>` (docs/security.md).
pub fn secret_allowed(caller: &crate::auth::Caller, value: &str) -> bool {
    if caller.is_operator() {
        return true;
    }
    if value.starts_with("env:") {
        return false;
    }
    match value.strip_prefix("file:") {
        None => true,
        Some(name) => name
            .strip_prefix(caller.tenant.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| !rest.is_empty()),
    }
}

/// A device's configuration checked as a whole: every bad field at once.
fn checked(app: &App, d: &Device) -> Result<(), Error> {
    let mut out = Vec::new();
    check_device(app, d, &mut out);
    if out.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(out))
    }
}

#[tonic::async_trait]
impl DeviceService for Devices {
    async fn create_device(
        &self,
        request: Request<pb::CreateDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let this = Self(self.0.for_call(&request)?);
        let req = convert::create_device(request.into_inner())?;
        Ok(Response::new(this.create(req).await?))
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let this = Self(self.0.for_call(&request)?);
        let id = convert::get_device(request.into_inner())?;
        let d = this.0.store.get_device(&this.0.tenant(), &id).await?;
        Ok(Response::new(this.to_proto(&d)))
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let this = Self(self.0.for_call(&request)?);
        let page = convert::list_devices(request.into_inner())?;
        Ok(Response::new(this.list(page).await?))
    }

    async fn update_device(
        &self,
        request: Request<pb::UpdateDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let this = Self(self.0.for_call(&request)?);
        let req = convert::update_device(request.into_inner())?;
        Ok(Response::new(this.update(req).await?))
    }

    async fn delete_device(
        &self,
        request: Request<pb::DeleteDeviceRequest>,
    ) -> Result<Response<()>, Status> {
        let this = Self(self.0.for_call(&request)?);
        let req = convert::delete_device(request.into_inner())?;
        this.delete(req).await?;
        Ok(Response::new(()))
    }
}
