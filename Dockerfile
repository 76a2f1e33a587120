# syntax=docker/dockerfile:1
# rollcall and the example web service in one small image:
#   docker build -t rollcall .
#   docker run --rm rollcall rollcall --help

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build between image builds; the
# binaries are copied out of the cached target dir.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin rollcall --example web_service \
    && mkdir -p /out \
    && cp target/release/rollcall target/release/examples/web_service /out/ \
    && strip /out/rollcall /out/web_service

FROM debian:bookworm-slim
# ca-certificates: for TLS to NATS with a public CA. bash (already in the
# base image) runs the compose healthchecks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin rollcall
COPY --from=build /out/rollcall /out/web_service /usr/local/bin/
USER rollcall
CMD ["rollcall", "--help"]
