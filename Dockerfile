# The operator image the Helm chart runs: built here, run on a minimal non-root base.
#
#   docker build -t ghcr.io/mailhook/mailhook:0.1.0 .
#
# Stage 1 compiles with the same Rust as CI (1.95) and the committed Cargo.lock.
FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
# mimalloc compiles a little C: the slim image needs a C compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY crds ./crds
# Cargo checks that every target in Cargo.toml exists, even when building one.
COPY tests/integration ./tests/integration
RUN cargo build --release --locked --bin mailhook \
 && cp target/release/mailhook /mailhook

# Stage 2: distroless "cc" (glibc and libgcc, no shell, no package manager), non-root
# (uid 65532, which the chart's securityContext also sets). It carries the CA certificates
# TLS to endpoints and the apiserver is verified with.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /mailhook /usr/local/bin/mailhook
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/mailhook"]
CMD ["run"]
