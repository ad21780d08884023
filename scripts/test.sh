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
# The coordinator's PostgreSQL backend: a throwaway server (scripts/test-postgres.sh).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_pkgs+=(postgresql)
need openssl openssl
need ss iproute2
# Each lease's encrypted scratch volume (agent/src/workloads/scratch).
need gocryptfs gocryptfs
# gocryptfs mounts through fusermount, which Debian's gocryptfs does not pull in.
need fusermount3 fuse3
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "== installing: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi

# GPU containers: Docker serves GPU device requests only when the NVIDIA
# Container Toolkit's hook is on dockerd's PATH. A host without a real one
# gets the stand-in from tests/fake-nvidia (it does nothing; the tests read
# which GPUs reached which container), and its dockerd is (re)started with
# it on PATH.
fake_hook_dir=/usr/local/lib/warden-test/bin
hook=nvidia-container-runtime-hook
dockerd_path() { # the PATH of the running dockerd, or nothing
  local pid
  pid=$(pidof dockerd 2>/dev/null | cut -d' ' -f1) || return 0
  [ -n "$pid" ] && tr '\0' '\n' <"/proc/$pid/environ" | sed -n 's/^PATH=//p'
}
start_dockerd() { # start_dockerd [PATH-PREFIX]
  echo "== starting dockerd${1:+ with $1 on its PATH}"
  (PATH="${1:+$1:}$PATH" dockerd >/tmp/warden-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start; see /tmp/warden-dockerd.log"; exit 1; }
}
prefix=
if ! command -v "$hook" >/dev/null 2>&1; then
  install -D -m 0755 tests/fake-nvidia/$hook "$fake_hook_dir/$hook"
  prefix=$fake_hook_dir
fi
if command -v docker >/dev/null 2>&1; then
  if docker info >/dev/null 2>&1 && [ -n "$prefix" ] && ! dockerd_path | grep -q "$fake_hook_dir"; then
    echo "== restarting dockerd: it has no NVIDIA hook on its PATH"
    kill "$(pidof dockerd | cut -d' ' -f1)"
    for _ in $(seq 1 60); do pidof dockerd >/dev/null || break; sleep 1; done
  fi
  docker info >/dev/null 2>&1 || start_dockerd "$prefix"
  if [ -n "$prefix" ] && ! dockerd_path | grep -q "$fake_hook_dir"; then
    echo "dockerd runs without $fake_hook_dir on its PATH (did its supervisor restart it?): GPU containers cannot start"
    exit 1
  fi
fi

# The coordinator's store tests run on SQLite and on this PostgreSQL.
. scripts/test-postgres.sh

rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy || true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
status=0
cargo test --workspace --locked "$@" || status=$?
# Tests that kill an agent mid-lease (as a crash would) leave that lease's
# scratch volume to its gocryptfs, as on a host without systemd: unmount
# what is left under the tests' temporary directories, which ends them.
awk '/ - fuse\.gocryptfs / && $5 ~ /^\/tmp\/\.tmp/ {print $5}' /proc/self/mountinfo |
  while read -r m; do umount -l "$m" || true; done
exit "$status"
