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

/// The gRPC codec of the generated stubs: prost, except that a request
/// body that is not a valid protobuf message is answered INVALID_ARGUMENT
/// (reason MALFORMED_REQUEST) instead of INTERNAL. Malformed input is the
/// client's fault, and a client must be able to tell it from a server bug.
pub mod codec {
    use std::marker::PhantomData;

    use prost::Message;
    use tonic::{
        Code, Status,
        codec::{BufferSettings, DecodeBuf},
    };
    use tonic_prost::{ProstDecoder, ProstEncoder};

    /// See the module docs.
    #[derive(Debug, Clone, Copy)]
    pub struct Codec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for Codec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> tonic::codec::Codec for Codec<T, U>
    where
        T: Message + Send + 'static,
        U: Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = ProstEncoder<T>;
        type Decoder = Decoder<U>;

        fn encoder(&mut self) -> Self::Encoder {
            ProstEncoder::new(BufferSettings::default())
        }

        fn decoder(&mut self) -> Self::Decoder {
            Decoder(ProstDecoder::new(BufferSettings::default()))
        }
    }

    /// Decodes with prost; maps parse failures to INVALID_ARGUMENT.
    #[derive(Debug)]
    pub struct Decoder<U>(ProstDecoder<U>);

    impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
        type Item = U;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
            self.0.decode(src).map_err(|s| {
                if s.code() == Code::Internal {
                    malformed(s.message())
                } else {
                    s
                }
            })
        }

        fn buffer_settings(&self) -> BufferSettings {
            self.0.buffer_settings()
        }
    }

    fn malformed(why: &str) -> Status {
        let message = format!("the message is not a valid protobuf encoding: {why}");
        let info = tonic_types::pb::ErrorInfo {
            reason: crate::v1::ErrorReason::MalformedRequest.reason().to_owned(),
            domain: "switchyard".to_owned(),
            metadata: Default::default(),
        };
        let body = tonic_types::pb::Status {
            code: Code::InvalidArgument as i32,
            message: message.clone(),
            details: vec![prost_types::Any {
                type_url: "type.googleapis.com/google.rpc.ErrorInfo".to_owned(),
                value: info.encode_to_vec(),
            }],
        };
        Status::with_details(Code::InvalidArgument, message, body.encode_to_vec().into())
    }
}
