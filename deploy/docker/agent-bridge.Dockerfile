# agent-bridge. Build from the repository root:
#   docker build -f deploy/docker/agent-bridge.Dockerfile -t agent-bridge:0.1.0 .
# The bridge crate carries neither the operator nor the SSM emulator (the demo is its own crate,
# `demo/`), so the image holds the product alone. Two stages: a Rust build on Debian 12,
# then the binary alone on distroless/cc (glibc, CA certificates for wss:// to ssmmessages, no
# shell), as the distroless nonroot user (65532), which the Deployment's runAsUser matches.
FROM docker.io/library/rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p fleet-access-agent-bridge --bin agent-bridge

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/agent-bridge /usr/local/bin/agent-bridge
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/agent-bridge"]
CMD ["serve"]
