#!/usr/bin/env bash
# Makes a local Docker engine and the project's base image ready. Idempotent: every step
# is skipped when its result is already there, so a rerun takes a second.
#
#   1. installs docker.io and debootstrap (apt) when dockerd / debootstrap are missing;
#   2. starts dockerd in the background (log: $RECML_CACHE_DIR/dockerd.log, pid file
#      $RECML_CACHE_DIR/dockerd.pid) unless `docker info` already answers, and waits until
#      it does. The engine keeps running after this script (and the tests) end;
#      `infra/bootstrap_docker.sh stop` (`make docker-stop`) stops it;
#   3. builds the base image the Dockerfiles start from ($RECML_BASE_IMAGE,
#      recml-base:bookworm): a minimal Debian bookworm rootfs made with debootstrap
#      (python3 3.11, python3-venv, ca-certificates, this machine's CA bundle), imported
#      with `docker import`. The rootfs tarball is cached under $RECML_CACHE_DIR.
#
# No image registry is reachable from this machine, hence the locally made base image; on
# Cloud Build the Dockerfiles take BASE_IMAGE=python:3.11-slim-bookworm instead.
#
# Usage: infra/bootstrap_docker.sh [--engine-only]
#        infra/bootstrap_docker.sh stop    stops the dockerd this script started (its pid
#                                          file), with its containers; any other engine is
#                                          left alone
# Environment: RECML_CACHE_DIR (~/.cache/recml), RECML_BASE_IMAGE (recml-base:bookworm),
#   RECML_DOCKER_STORAGE_DRIVER (overlay2, falls back to vfs), DEBIAN_MIRROR, RECML_CA_BUNDLE.
set -euo pipefail

cache=${RECML_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/recml}
base_image=${RECML_BASE_IMAGE:-recml-base:bookworm}
driver=${RECML_DOCKER_STORAGE_DRIVER:-overlay2}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ca_bundle=${RECML_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
suite=bookworm
base_packages=python3,python3-venv,ca-certificates

log() { echo "bootstrap_docker: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
sudo_=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { log "ERROR: needs root (or sudo)"; exit 1; }
  sudo_=(sudo)
fi
as_root() { "${sudo_[@]}" "$@"; }

engine_only=false
stop=false
case "${1:-}" in
  --engine-only) engine_only=true ;;
  stop) stop=true ;;
  "") ;;
  *) die "unknown argument $1 (usage: $0 [--engine-only | stop])" ;;
esac

mkdir -p "$cache"
pidfile=$cache/dockerd.pid

running() {  # $1: pid -> whether it is a live (not zombie) dockerd
  [ -n "$1" ] && [ "$(ps -o comm= -p "$1" 2>/dev/null)" = dockerd ] \
    && [[ "$(ps -o stat= -p "$1")" != Z* ]]
}

if $stop; then
  pid=$(cat "$pidfile" 2>/dev/null || true)
  if ! running "$pid"; then
    as_root rm -f "$pidfile"
    others=$(pgrep -x dockerd | tr '\n' ' ' || true)
    log "no engine started by this script is running${others:+ (dockerd pid ${others% } was started otherwise: left alone)}"
    exit 0
  fi
  log "stopping dockerd (pid $pid) and its containers"
  as_root kill -TERM "$pid"
  for _ in $(seq 60); do  # dockerd stops its containers first (10 s each at most)
    running "$pid" || { as_root rm -f "$pidfile"; log "dockerd stopped"; exit 0; }
    sleep 1
  done
  die "dockerd (pid $pid) still runs 60 s after SIGTERM; see $cache/dockerd.log"
fi
# One bootstrap at a time on this machine (several test runs may start together).
exec 9>"$cache/bootstrap.lock"
flock 9

# --- 1. packages -----------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker >/dev/null || missing+=(docker.io)
$engine_only || command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} (apt)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
fi

# --- 2. the engine ---------------------------------------------------------------------
start_dockerd() {  # $1: storage driver; returns non-zero when it does not answer in 60 s
  log "starting dockerd (storage driver $1, log $cache/dockerd.log)"
  # Own session, lock fd closed: the engine outlives this script and does not hold the lock.
  "${sudo_[@]}" setsid dockerd --storage-driver="$1" --pidfile="$pidfile" \
    >>"$cache/dockerd.log" 2>&1 </dev/null 9>&- &
  local pid=$!
  for _ in $(seq 60); do
    if docker info >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 1
  done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  return 1
}

if docker info >/dev/null 2>&1; then
  log "a Docker engine is running ($(docker info --format '{{.ServerVersion}}, {{.Driver}}'))"
else
  if pgrep -x dockerd >/dev/null; then
    die "dockerd runs but does not answer; see $cache/dockerd.log"
  fi
  start_dockerd "$driver" || { [ "$driver" != vfs ] && start_dockerd vfs; } \
    || die "dockerd did not start; last lines of $cache/dockerd.log:
$(tail -n 20 "$cache/dockerd.log")"
  log "Docker engine ready ($(docker info --format '{{.ServerVersion}}, {{.Driver}}'))"
fi
$engine_only && exit 0

# --- 3. the base image -----------------------------------------------------------------
if docker image inspect "$base_image" >/dev/null 2>&1; then
  log "base image $base_image exists"
  exit 0
fi
[ -r "$ca_bundle" ] || die "CA bundle $ca_bundle not found"
# The tarball's name changes with what goes in it, so a changed package list or CA bundle
# makes a new one rather than reusing a stale one.
key=$(printf '%s\n' "$suite" "$base_packages" "$mirror" "$(sha256sum <"$ca_bundle")" \
  | sha256sum | cut -c1-12)
tarball="$cache/rootfs-$suite-$key.tar"
if [ ! -s "$tarball" ]; then
  rootfs=$(mktemp -d "$cache/rootfs.XXXXXX")
  trap 'as_root rm -rf "$rootfs"' EXIT
  log "debootstrap $suite ($base_packages) into $rootfs (a few minutes)"
  as_root debootstrap --variant=minbase --include="$base_packages" "$suite" "$rootfs" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $cache/debootstrap.log"
  # pip in the images reaches PyPI only with this machine's CA bundle (see docs/design.md).
  as_root cp "$ca_bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  as_root tar -C "$rootfs" --numeric-owner -cf "$tarball.partial" .
  as_root mv "$tarball.partial" "$tarball"
fi
log "importing $tarball as $base_image"
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --change "LABEL org.opencontainers.image.description=\"Debian $suite + python3 (debootstrap)\"" \
  "$tarball" "$base_image" >/dev/null
log "base image $base_image ready ($(docker image inspect -f '{{.Size}}' "$base_image" \
  | awk '{printf "%.0f MB", $1/1e6}'))"
