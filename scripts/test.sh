#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs from
# Debian's packages, makes sure Docker answers, then checks formatting,
# lints and runs every test. CI (.ci/run) calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
need() { # need COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2")
}
need cc build-essential
need pkg-config pkg-config
need ip iproute2
need docker docker.io
# The test image needs the static build (Debian's busybox package is dynamic).
dpkg -s busybox-static >/dev/null 2>&1 || need_pkgs+=(busybox-static)
# The independent Python verifier of the conformance vectors (tests/vectors/py).
dpkg -s python3-cryptography >/dev/null 2>&1 || need_pkgs+=(python3-cryptography)
# Mesh interop: stock WireGuard tools and a TCP load.
need wireguard-go wireguard-go
need wg wireguard-tools
need iperf3 iperf3
# The package test: a clean Debian root to install the .deb into (systemd-analyze
# runs inside it, so the host needs no systemd), and the .deb's library Depends.
need debootstrap debootstrap
need dpkg-shlibdeps dpkg-dev
# The Ray image (tests/common/ray.rs): the host's pip fetches Ray's wheels into
# a debootstrapped root.
python3 -m pip --version >/dev/null 2>&1 || need_pkgs+=(python3-pip)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "== installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

# Docker tests need a live engine: start one if none answers.
if command -v docker >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
  echo "== starting dockerd"
  (dockerd >/tmp/warden-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /tmp/warden-dockerd.log"; exit 1; }
fi

rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked "$@"
