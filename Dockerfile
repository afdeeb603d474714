# vmproxy as a container: `docker build -t vmproxy .`, then
# `docker run -p 8080:8080 -v $PWD/vmproxy.toml:/etc/vmproxy/vmproxy.toml vmproxy`.
# The config's `listen = "0.0.0.0:${PORT:-8080}"` takes the port from $PORT when the platform
# sets it (Cloud Run does), 8080 otherwise. See docs/cloud-run.md.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release --bin vmproxy

# The runtime: glibc (same Debian as the builder) and the CA certificates the gce backend needs
# to reach compute.googleapis.com. A [route.process] command runs inside this image: add what it
# needs (python3, node, ...) in an image built FROM this one.
FROM debian:bookworm-slim
# Unpinned on purpose: CA certificates should be the distribution's current ones.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin vmproxy
COPY --from=build /src/target/release/vmproxy /usr/local/bin/vmproxy
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/vmproxy"]
CMD ["--config", "/etc/vmproxy/vmproxy.toml"]
