//! Generated types and gRPC stubs for the `switchyard.v1` API. Nothing here
//! is hand-written beyond this module: conversions live in the service.

/// The `switchyard.v1` package.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/switchyard.v1.rs"));
}

/// Encoded `FileDescriptorSet` of the switchyard protos and their imports,
/// for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_descriptor.bin"));

impl v1::ErrorReason {
    /// The reason string sent in `google.rpc.ErrorInfo.reason`: the value
    /// name without its `ERROR_REASON_` prefix.
    pub fn reason(self) -> &'static str {
        let name = self.as_str_name();
        name.strip_prefix("ERROR_REASON_").unwrap_or(name)
    }
}
