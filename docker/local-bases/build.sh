#!/usr/bin/env bash
# Local stand-ins for the third-party images genq's compose files name, built from Debian packages,
# for machines that reach Debian's mirror and PyPI but no image registry (air-gapped CI, this project's
# own `make deploy-smoke`). Production pulls the official images; docs/deploy.md says how to point
# the compose files at these (or at a mirror) with the *_IMAGE variables.
#
#   docker/local-bases/build.sh            # builds what is missing, prints `export` lines
#   FORCE=1 docker/local-bases/build.sh    # rebuilds all of them
#
# Images (tag genq-local/*): debian:bookworm (debootstrap, + this host's CA certificates so that apt and
# pip work behind a TLS-inspecting proxy), python:3.11 (python:3.12-slim's role), redis:7, postgres:15
# (honours POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB as the official image does), prometheus:2.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${GENQ_DEPLOY_CACHE:-/var/cache/genq-deploy}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
mkdir -p "$cache"

have() { [ -z "${FORCE:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }
say() { echo "local-bases: $*" >&2; }

if ! have genq-local/debian-rootfs:$suite; then
    tarball=$cache/debian-$suite-rootfs.tar
    if [ ! -s "$tarball" ] || [ -n "${FORCE:-}" ]; then
        say "debootstrap $suite from $mirror (about a minute)"
        rm -rf "$cache/rootfs"
        debootstrap --variant=minbase --include=ca-certificates "$suite" "$cache/rootfs" "$mirror" >"$cache/debootstrap.log"
        # as in Debian's own images: no package caches, no recommends
        rm -rf "$cache"/rootfs/var/cache/apt/archives/*.deb "$cache"/rootfs/var/lib/apt/lists/*
        printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
            >"$cache/rootfs/etc/apt/apt.conf.d/90genq-no-recommends"
        tar -C "$cache/rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$cache/rootfs"
    fi
    docker import --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        "$tarball" genq-local/debian-rootfs:$suite >/dev/null
fi

build() {   # build TAG DOCKERFILE [CONTEXT]
    if have "$1"; then say "$1 cached"; return; fi
    say "building $1"
    local log=$cache/build-${1//[\/:]/-}.log
    docker build -t "$1" -f "$here/$2" "${3:-$here}" >"$log" 2>&1 || { tail -30 "$log" >&2; exit 1; }
}

# This host's extra CA certificates (a TLS-inspecting proxy's, a company CA): apt and pip inside
# builds trust what the host trusts.
cas=$(mktemp -d); trap 'rm -rf "$cas"' EXIT
cp "$here/debian.Dockerfile" "$cas/"
mkdir -p "$cas/ca"
cp /usr/local/share/ca-certificates/*.crt "$cas/ca/" 2>/dev/null || true
build genq-local/debian:$suite debian.Dockerfile "$cas"
build genq-local/python:3.11 python.Dockerfile
build genq-local/redis:7 redis.Dockerfile
build genq-local/postgres:15 postgres.Dockerfile
build genq-local/prometheus:2 prometheus.Dockerfile

cat <<VARS
export PYTHON_IMAGE=genq-local/python:3.11
export WORKER_CPU_BASE_IMAGE=genq-local/debian:$suite
export REDIS_IMAGE=genq-local/redis:7
export POSTGRES_IMAGE=genq-local/postgres:15
export PROMETHEUS_IMAGE=genq-local/prometheus:2
VARS
