#!/usr/bin/env bash
# A local base image for the Dockerfile where no container registry is reachable (only Debian's
# mirror and PyPI): Debian bookworm (minbase, by debootstrap) with Python 3.11 and its venv module,
# what the Dockerfile needs from python:3.11-slim-bookworm. Run as root; imported into podman (or
# docker) under NAME, then `make image BASE_IMAGE=NAME`.
#
#   docker/base-image.sh [NAME]          # default localhost/qlora-base:bookworm
#
# ENGINE picks the engine (podman, else docker); DEBIAN_MIRROR the mirror. CA certificates the host
# added (/usr/local/share/ca-certificates) are trusted in the image too, so a build behind a
# TLS-inspecting proxy reaches PyPI.
set -euo pipefail

NAME="${1:-localhost/qlora-base:bookworm}"
ENGINE="${ENGINE:-$(command -v podman || command -v docker)}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR"
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$ROOTFS/usr/local/share/ca-certificates/"
  chroot "$ROOTFS" update-ca-certificates
fi
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/*
# pip reads the system's CA bundle (its own, certifi's, lacks any CA added above)
tar -C "$ROOTFS" -c . | "$ENGINE" import \
  --change 'ENV LANG=C.UTF-8 PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' - "$NAME"
