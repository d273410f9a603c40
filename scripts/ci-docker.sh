#!/usr/bin/env bash
# Make a Docker daemon answer on this machine for tests/test_docker.py, if it can be done:
# root, Debian's apt, no daemon yet -> install docker.io, docker-compose and debootstrap, start
# `dockerd --iptables=false --bridge=none` (host networking only) and wait until it answers.
# Exits non-zero, with the reason, where it cannot; callers treat that as "no Docker".
set -uo pipefail
if docker info >/dev/null 2>&1 && command -v debootstrap >/dev/null \
  && { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null; }; then
  echo "ci-docker: a Docker daemon answers already"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then echo "ci-docker: not root"; exit 1; fi
if ! command -v apt-get >/dev/null; then echo "ci-docker: no apt-get"; exit 1; fi
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  echo "ci-docker: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null \
    || { echo "ci-docker: apt-get install ${need[*]} failed"; exit 1; }
fi
if ! docker info >/dev/null 2>&1; then
  log=${TMPDIR:-/tmp}/dockerd.log
  echo "ci-docker: starting dockerd (log: $log)"
  setsid dockerd --iptables=false --bridge=none >"$log" 2>&1 < /dev/null &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! docker info >/dev/null 2>&1; then
    echo "ci-docker: dockerd did not answer within 60 s; its log ends:"
    tail -5 "$log"
    exit 1
  fi
fi
echo "ci-docker: $(docker version --format 'engine {{.Server.Version}}') ready"
