# rollcall and the example web service in one small image, for users with a
# registry (docker compose up --build); scripts/compose.sh builds the same
# binaries into a scratch image where no registry is at hand.
#   docker build -t rollcall .
#   docker run --rm rollcall rollcall --help
#
# No BuildKit-only syntax (cache mounts, a syntax directive), so docker-compose v1's
# classic builder takes it too. The dependencies are built in a layer of
# their own, from the manifests alone, so a source change rebuilds rollcall
# and not every crate.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin/rollcall examples benches \
    && echo 'fn main() {}' >src/bin/rollcall/main.rs \
    && echo 'fn main() {}' >examples/web_service.rs \
    && echo 'fn main() {}' >benches/fold.rs \
    && echo 'fn main() {}' >benches/rotation.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin rollcall --example web_service \
    && rm -rf src examples benches
COPY . .
# The stub build left fresh-looking outputs for the crate itself; touching
# the real sources makes cargo rebuild it.
RUN find src examples -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --bin rollcall --example web_service \
    && mkdir -p /out \
    && cp target/release/rollcall target/release/examples/web_service /out/ \
    && strip /out/rollcall /out/web_service

FROM debian:bookworm-slim
# ca-certificates: for TLS to NATS with a public CA. The health checks run
# `rollcall probe`, so the image needs no curl or wget.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin rollcall
COPY --from=build /out/rollcall /out/web_service /usr/local/bin/
USER rollcall
CMD ["rollcall", "--help"]
