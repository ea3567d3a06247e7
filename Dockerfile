# The operator image the Helm chart runs: mailhook on a minimal non-root base (no shell, no
# package manager), with the SBOM of what it was built from.
#
# Published (multi-arch: both bases are multi-arch; each platform compiles in its own builder,
# natively or under emulation; BuildKit skips the unused "prebuilt" stage):
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) \
#     -t ghcr.io/mailhook/mailhook:0.1.0 .
# Local (this repository's tests; no base image can be pulled there): tests/image/build
# compiles on the host, assembles a runtime base of the same shape and builds with
#   --build-arg BINARY=prebuilt --build-arg RUNTIME_IMAGE=localhost/mailhook-runtime-base:test
# Both worlds share the final stage: the same user, paths, entrypoint and labels.

ARG BUILDER_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
# Where /out/mailhook and /out/sbom.cdx.json come from: "compiled" (from source, in
# BUILDER_IMAGE) or "prebuilt" (dist/ of the build context).
ARG BINARY=compiled

# Compiles with the same Rust as CI (1.95) and the committed Cargo.lock.
FROM ${BUILDER_IMAGE} AS compiled
WORKDIR /src
# mimalloc compiles a little C: the slim image needs a C compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
RUN cargo install --locked cargo-cyclonedx@0.5.9
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY crds ./crds
# Cargo checks that every target in Cargo.toml exists, even when building one.
COPY tests ./tests
RUN cargo build --release --locked --bin mailhook \
 && cargo cyclonedx --format json --spec-version 1.5 --target "$(rustc -vV | sed -n 's/^host: //p')" \
 && mkdir /out && cp target/release/mailhook /out/mailhook && cp mailhook.cdx.json /out/sbom.cdx.json

FROM scratch AS prebuilt
COPY dist/mailhook dist/sbom.cdx.json /out/

FROM ${BINARY} AS binary

# Distroless "cc" (glibc and libgcc, CA certificates, a nonroot user; no shell, no package
# manager), or the local base of the same shape.
FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mailhook" \
      org.opencontainers.image.description="Kubernetes operator: mailbox activity to signed, reliable webhook deliveries" \
      org.opencontainers.image.source="https://github.com/mailhook/mailhook" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=binary /out/mailhook /usr/local/bin/mailhook
COPY --from=binary /out/sbom.cdx.json /usr/share/doc/mailhook/sbom.cdx.json
# uid 65532 ("nonroot" in distroless), which the chart's securityContext also sets.
USER 65532:65532
WORKDIR /home/nonroot
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/mailhook"]
CMD ["run"]
