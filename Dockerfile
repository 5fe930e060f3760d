# syntax=docker/dockerfile:1
# The switchyard server as a container image: the binary alone, run as a
# non-root user, on a read-only root filesystem (docs/operations.md,
# "Container image").
#
#   docker build -t switchyard .
#   docker run --rm -p 50051:50051 -v switchyard-data:/data switchyard
#
# Build stage: the workspace's locked dependencies, release profile, only
# the server binary.
FROM rust:1.94-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p switchyard --bin switchyard \
 && install -D -m 0755 target/release/switchyard /out/switchyard \
 && install -d -m 0750 -o 65532 -g 65532 /out/data

# Run stage: a distroless base with glibc and CA certificates (the OEM
# clouds and webhook receivers are reached over TLS with webpki roots
# compiled in; the certificates serve anything else that needs them), no
# shell, no package manager. UID/GID 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/switchyard /usr/local/bin/switchyard
# Owned by the user the server runs as: a new volume mounted here takes
# this ownership, so the server can create its SQLite file.
COPY --from=build --chown=65532:65532 /out/data /data
# The SQLite file lives on a volume; with PostgreSQL nothing is written
# locally and the root filesystem can be mounted read-only.
VOLUME ["/data"]
WORKDIR /data
ENV SWITCHYARD_LISTEN=0.0.0.0:50051 \
    SWITCHYARD_DATABASE_URL=sqlite:///data/switchyard.db \
    SWITCHYARD_LOG_FORMAT=json
EXPOSE 50051
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["serve"]
