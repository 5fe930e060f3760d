//! DeviceService.

use std::collections::BTreeMap;

use switchyard_proto::v1::{self as pb, device_service_server::DeviceService};
use tonic::{Request, Response, Status};

use super::{
    App, body_without_key, check_len, convert, decode_token, encode_token, page_size,
    parse_device_id, status::to_status,
};
use crate::domain::{Device, DeviceId, Error, FieldViolation, Reason, Ts, device::valid_timezone};

const MAX_NAME: usize = 200;
const MAX_SETTINGS: usize = 64;
const MAX_SETTING_KEY: usize = 64;
const MAX_SETTING_VALUE: usize = 2048;

/// Implements `switchyard.v1.DeviceService`.
#[derive(Clone, Debug)]
pub struct Devices(pub App);

/// Checks the mutable fields of a device and its driver settings.
fn check_device(app: &App, d: &Device, out: &mut Vec<FieldViolation>) {
    check_len(out, "device.display_name", &d.display_name, MAX_NAME);
    check_len(out, "device.oem_device_id", &d.oem_device_id, MAX_NAME);
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
    for (k, v) in &d.settings {
        if k.len() > MAX_SETTING_KEY || v.len() > MAX_SETTING_VALUE {
            out.push(FieldViolation::new(
                "device.settings",
                Reason::InvalidField,
                format!("setting keys are at most {MAX_SETTING_KEY} bytes and values at most {MAX_SETTING_VALUE}"),
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
    if let Err(e) = factory.capabilities(&d.spec()) {
        let (field, reason) = match e.key() {
            Some(k) => (format!("device.settings[{k:?}]"), Reason::InvalidSettings),
            None => ("device.family".to_owned(), Reason::InvalidField),
        };
        out.push(FieldViolation::new(
            field,
            reason,
            format!("driver {:?}: {e}", d.driver),
        ));
    }
}

impl Devices {
    fn to_proto(&self, d: &Device) -> pb::Device {
        convert::device_to_proto(d, self.0.capabilities(d).as_ref())
    }

    async fn create(&self, req: pb::CreateDeviceRequest) -> Result<pb::Device, Error> {
        let app = &self.0;
        let Some(dev) = req.device.as_ref() else {
            return Err(Error::invalid(
                "device",
                Reason::MissingField,
                "device is required",
            ));
        };
        let mut out = Vec::new();
        let id_str = match (req.device_id.as_str(), dev.device_id.as_str()) {
            ("", "") => None,
            (a, "") => Some((a, "device_id")),
            ("", b) => Some((b, "device.device_id")),
            (a, b) if a == b => Some((a, "device_id")),
            _ => {
                return Err(Error::invalid(
                    "device.device_id",
                    Reason::InvalidField,
                    "device_id and device.device_id differ",
                ));
            }
        };
        let id = match id_str {
            None => DeviceId::generate(),
            Some((s, field)) => parse_device_id(s, field)?,
        };
        let family = convert::family_from_proto(dev.family)?;
        if family.is_none() {
            out.push(FieldViolation::new(
                "device.family",
                Reason::MissingField,
                "family is required",
            ));
        }
        if dev.driver.is_empty() {
            out.push(FieldViolation::new(
                "device.driver",
                Reason::MissingField,
                "driver is required",
            ));
        } else if app.registry.get(&dev.driver).is_none() {
            out.push(FieldViolation::new(
                "device.driver",
                Reason::UnknownDriver,
                format!(
                    "no driver {:?}; available: {}",
                    dev.driver.chars().take(64).collect::<String>(),
                    app.registry.kinds().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        let device = Device {
            id,
            display_name: dev.display_name.clone(),
            family: family.unwrap_or(crate::domain::Family::Battery),
            driver: dev.driver.clone(),
            oem_device_id: dev.oem_device_id.clone(),
            timezone: if dev.timezone.is_empty() {
                "UTC".to_owned()
            } else {
                dev.timezone.clone()
            },
            settings: dev.settings.clone().into_iter().collect::<BTreeMap<_, _>>(),
            revision: 0,
            created: Ts(0),
            updated: Ts(0),
            observed: None,
        };
        if out.is_empty() {
            check_device(app, &device, &mut out);
        }
        if !out.is_empty() {
            return Err(Error::Invalid(out));
        }
        let body = body_without_key(&req, |r| r.request_id.clear());
        let this = self.clone();
        let tenant = app.tenant();
        app.idempotent(
            "CreateDevice",
            &req.request_id,
            body,
            move |d: &Device| this.to_proto(d),
            |idem| async move { app.store.create_device(&tenant, device, idem).await },
        )
        .await
        // The dispatcher observes new and changed devices.
        .inspect(|_| app.wake.notify_one())
    }

    async fn update(&self, req: pb::UpdateDeviceRequest) -> Result<pb::Device, Error> {
        let app = &self.0;
        let Some(dev) = req.device.as_ref() else {
            return Err(Error::invalid(
                "device",
                Reason::MissingField,
                "device is required",
            ));
        };
        let id = parse_device_id(&dev.device_id, "device.device_id")?;
        let paths: Vec<String> = req
            .update_mask
            .as_ref()
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        if paths.is_empty() {
            return Err(Error::invalid(
                "update_mask",
                Reason::MissingField,
                "update_mask must name the fields to change: display_name, oem_device_id, timezone, settings",
            ));
        }
        let mut bad = Vec::new();
        for p in &paths {
            match p.as_str() {
                "display_name" | "oem_device_id" | "timezone" | "settings" => {}
                "device_id" | "family" | "driver" => bad.push(FieldViolation::new(
                    "update_mask",
                    Reason::InvalidField,
                    format!("{p} is immutable"),
                )),
                "capabilities" | "etag" | "create_time" | "update_time" => {
                    bad.push(FieldViolation::new(
                        "update_mask",
                        Reason::InvalidField,
                        format!("{p} is output only"),
                    ))
                }
                _ => bad.push(FieldViolation::new(
                    "update_mask",
                    Reason::InvalidField,
                    format!("unknown field {:?}", p.chars().take(64).collect::<String>()),
                )),
            }
        }
        if !bad.is_empty() {
            return Err(Error::Invalid(bad));
        }
        let etag = (!dev.etag.is_empty()).then(|| dev.etag.clone());
        let new = dev.clone();
        let body = body_without_key(&req, |r| r.request_id.clear());
        let this = self.clone();
        let tenant = app.tenant();
        let checker = app.clone();
        app.idempotent(
            "UpdateDevice",
            &req.request_id,
            body,
            move |d: &Device| this.to_proto(d),
            |idem| async move {
                app.store
                    .update_device(
                        &tenant,
                        &id,
                        etag.as_deref(),
                        move |d| {
                            for p in &paths {
                                match p.as_str() {
                                    "display_name" => d.display_name = new.display_name.clone(),
                                    "oem_device_id" => d.oem_device_id = new.oem_device_id.clone(),
                                    "timezone" => {
                                        d.timezone = if new.timezone.is_empty() {
                                            "UTC".to_owned()
                                        } else {
                                            new.timezone.clone()
                                        }
                                    }
                                    "settings" => {
                                        d.settings = new.settings.clone().into_iter().collect()
                                    }
                                    _ => {}
                                }
                            }
                            let mut out = Vec::new();
                            check_device(&checker, d, &mut out);
                            if out.is_empty() {
                                Ok(())
                            } else {
                                Err(Error::Invalid(out))
                            }
                        },
                        idem,
                    )
                    .await
            },
        )
        .await
        .inspect(|_| app.wake.notify_one())
    }
}

#[tonic::async_trait]
impl DeviceService for Devices {
    async fn create_device(
        &self,
        request: Request<pb::CreateDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        self.create(request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn get_device(
        &self,
        request: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let req = request.into_inner();
        let run = async {
            let id = parse_device_id(&req.device_id, "device_id")?;
            let d = self.0.store.get_device(&self.0.tenant(), &id).await?;
            Ok(self.to_proto(&d))
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn list_devices(
        &self,
        request: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        let req = request.into_inner();
        let run = async {
            let limit = page_size(req.page_size)?;
            let after = decode_token(&req.page_token, "devices")?;
            let mut ds = self
                .0
                .store
                .list_devices(&self.0.tenant(), after.as_deref(), limit + 1)
                .await?;
            let more = ds.len() > limit as usize;
            ds.truncate(limit as usize);
            let next = match ds.last() {
                Some(last) if more => encode_token("devices", last.id.as_str()),
                _ => String::new(),
            };
            Ok(pb::ListDevicesResponse {
                devices: ds.iter().map(|d| self.to_proto(d)).collect(),
                next_page_token: next,
            })
        };
        run.await.map(Response::new).map_err(to_status)
    }

    async fn update_device(
        &self,
        request: Request<pb::UpdateDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        self.update(request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn delete_device(
        &self,
        request: Request<pb::DeleteDeviceRequest>,
    ) -> Result<Response<()>, Status> {
        let req = request.into_inner();
        let app = &self.0;
        let run = async {
            let id = parse_device_id(&req.device_id, "device_id")?;
            let etag = (!req.etag.is_empty()).then(|| req.etag.clone());
            let body = body_without_key(&req, |r| r.request_id.clear());
            let tenant = app.tenant();
            app.idempotent(
                "DeleteDevice",
                &req.request_id,
                body,
                |_: &()| (),
                |idem| async move {
                    app.store
                        .delete_device(&tenant, &id, etag.as_deref(), req.force, idem)
                        .await
                },
            )
            .await
        };
        run.await.map(Response::new).map_err(to_status)
    }
}
