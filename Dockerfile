# syntax=docker/dockerfile:1
# cx-gateway image: a release build on the Rust toolchain image, copied onto a distroless base
# that holds glibc, libgcc and CA certificates and nothing else (no shell, no package manager).

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target directory between builds; the binary is copied
# out of the cached target directory because cache mounts are not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin cx-gateway \
    && install -D -m 0755 target/release/cx-gateway /out/cx-gateway \
    && mkdir -p /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/cx-gateway /usr/local/bin/cx-gateway
# The default data directory, owned by the runtime user so `docker run` works without a volume;
# Kubernetes mounts the persistent volume here.
COPY --from=builder --chown=65532:65532 /out/data /var/lib/cx-gateway
ENV CXGW_DATA_DIR=/var/lib/cx-gateway
# Numeric, so Kubernetes can verify runAsNonRoot (65532 is distroless's "nonroot").
USER 65532:65532
EXPOSE 50051 8080
ENTRYPOINT ["/usr/local/bin/cx-gateway"]
CMD ["serve"]
