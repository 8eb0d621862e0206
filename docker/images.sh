#!/usr/bin/env bash
# `make images`: every image of docker/compose.local.yml, built on a machine without an
# image registry. Base images come from debootstrap (Debian's own mirror) and
# `docker import`, once; the builds run with the host's network (apt and pip reach their
# registries as the machine does) and install torch from the machine's CPU wheel, served
# on loopback for the build so that no layer keeps a copy of it. Idempotent: existing
# base images are kept, and Docker's layer cache makes a rebuild quick.
set -euo pipefail
cd "$(dirname "$0")/.."
# The Debian mirror: DEBIAN_MIRROR, else the first Debian archive (a URI ending in /debian,
# not -security) of this machine's apt sources, else debootstrap's own default; another
# distribution's archive or a third-party repository is never taken for it.
machine_mirror() {
    { grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | tr ' ' '\n'
      grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
          tr ' ' '\n'; } | grep -E '^(https?|file)://.*/debian/?$' | head -1 || true
}
MIRROR=${DEBIAN_MIRROR:-$(machine_mirror)}
ROOTS=${IMAGE_ROOTS:-/var/tmp/latentbank-rootfs}
say() { printf 'images: %s\n' "$*"; }
command -v docker >/dev/null || { say "no docker client (apt-get install docker.io)"; exit 1; }
docker info >/dev/null 2>&1 || {
    say "no Docker engine answers (start one: dockerd --storage-driver=vfs --iptables=false --bridge=none &)"
    exit 1; }

base() {  # latentbank-base:SUITE, a minimal Debian SUITE
    local suite=$1
    if docker image inspect "latentbank-base:$suite" >/dev/null 2>&1; then
        say "latentbank-base:$suite is there"
        return
    fi
    command -v debootstrap >/dev/null || { say "no debootstrap (apt-get install debootstrap)"; exit 1; }
    say "debootstrap $suite from ${MIRROR:-the default mirror of debootstrap}"
    rm -rf "${ROOTS:?}/$suite" && mkdir -p "$ROOTS"
    debootstrap --variant=minbase "$suite" "$ROOTS/$suite" ${MIRROR:+"$MIRROR"} > "$ROOTS/$suite.log" 2>&1 ||
        { tail -20 "$ROOTS/$suite.log"; exit 1; }
    tar -C "$ROOTS/$suite" -c . | docker import - "latentbank-base:$suite" >/dev/null
    rm -rf "${ROOTS:?}/$suite"
}
base bookworm   # Python 3.11, which the CPU torch wheel is built for
base trixie     # PostgreSQL 17 with pgvector 0.8, Redis 8

# torch for the worker: the CPU wheel pip finds here (its find-links or index), if any
WHEELS=$(mktemp -d)
SERVER=
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$WHEELS"; }
trap cleanup EXIT
PY=${PYTHON:-python3}
# one fixed port: the URLs below are build arguments, part of the layers' cache keys
PORT=${LB_BUILD_FILES_PORT:-58390}
serve() {
    [ -n "$SERVER" ] && return
    "$PY" -m http.server "$PORT" --bind 127.0.0.1 --directory "$WHEELS" >/dev/null 2>&1 &
    SERVER=$!
    sleep 1
    kill -0 "$SERVER" 2>/dev/null || { say "port $PORT is busy (set LB_BUILD_FILES_PORT)"; exit 1; }
}
torch_args=()
if "$PY" -m pip download --no-deps --quiet -d "$WHEELS" "torch==2.13.0" >/dev/null 2>&1 &&
        wheel=$(ls "$WHEELS"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1) && [ -n "$wheel" ]; then
    serve
    torch_args=(--build-arg TORCH_INDEX= --build-arg "TORCH_SPEC=torch @ http://127.0.0.1:$PORT/$(basename "$wheel")")
    say "torch from $(basename "$wheel") (served on 127.0.0.1:$PORT for the build)"
else
    say "no local CPU wheel of torch 2.13.0: the worker image resolves torch==2.13.0 from pip's configured index (set TORCH_INDEX for a CPU-only wheel index)"
fi

# this machine's extra certificate authorities (a TLS-inspecting proxy's), for pip in
# the builds: served on loopback like the wheel
ca_args=()
cas=$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)
if [ -n "$cas" ]; then
    cp $cas "$WHEELS"/
    serve
    urls=""
    for ca in $cas; do urls="$urls http://127.0.0.1:$PORT/$(basename "$ca")"; done
    ca_args=(--build-arg "EXTRA_CA_URLS=${urls# }")
    say "trusting this machine's $(echo "$cas" | wc -w) extra certificate authorities in the builds"
fi

build() {  # build NAME [docker build arguments...]
    local name=$1; shift
    say "building $name"
    local started=$SECONDS
    local log="$ROOTS/build-$name.log"
    mkdir -p "$ROOTS"
    docker build --network host -t "$name" "$@" . > "$log" 2>&1 || { tail -40 "$log"; exit 1; }
    say "  $name in $((SECONDS - started)) s (log $log)"
}
py=(--build-arg PYTHON_BASE=latentbank-base:bookworm "${ca_args[@]}")
deb=(--build-arg DEBIAN_BASE=latentbank-base:trixie)
build latentbank-api --target api "${py[@]}"
build latentbank-worker --target worker "${py[@]}" "${torch_args[@]}"
build latentbank-s3-test --target s3-test "${py[@]}"
build latentbank-postgres -f docker/postgres.Dockerfile "${deb[@]}"
build latentbank-redis -f docker/redis.Dockerfile "${deb[@]}"
docker image prune -f >/dev/null  # superseded layers (vfs keeps whole copies of each)
say "sizes:"
for image in latentbank-api latentbank-worker latentbank-s3-test latentbank-postgres latentbank-redis; do
    size=$(docker image inspect -f '{{.Size}}' "$image")
    printf 'images:   %-22s %6d MiB\n' "$image" $((size / 1048576))
done
