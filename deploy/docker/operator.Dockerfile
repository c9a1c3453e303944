# fleet-access-operator. Build from the repository root:
#   docker build -f deploy/docker/operator.Dockerfile -t fleet-access-operator:0.1.0 .
# Two stages: a Rust build on Debian 12, then the binary alone on distroless/cc (glibc, CA
# certificates, no shell, no package manager), as the distroless nonroot user (65532), which the
# Deployment's runAsUser matches.
FROM docker.io/library/rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p fleet-access-operator --bin fleet-access-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/fleet-access-operator /usr/local/bin/fleet-access-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/fleet-access-operator"]
CMD ["run"]
