#!/bin/sh
# Builds warden_<version>_<arch>.deb from a built `warden` binary, with
# dpkg-deb (no cargo-deb: nothing to compile in CI).
#
#   packaging/build-deb.sh BINARY OUTDIR [VERSION]
#
# VERSION defaults to the binary's own (`warden --version`) with Debian
# revision 1. Prints the path of the .deb. Needs dpkg-deb, and dpkg-shlibdeps
# (dpkg-dev) for the library dependencies; strips the binary when `strip` is there.
set -eu

usage() {
	echo "usage: $0 BINARY OUTDIR [VERSION]" >&2
	exit 2
}
[ $# -ge 2 ] && [ $# -le 3 ] || usage
binary=$1
outdir=$2
[ -x "$binary" ] || { echo "$0: $binary is not an executable" >&2; exit 1; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")

if [ $# -eq 3 ]; then
	version=$3
else
	# "warden 0.1.0" -> "0.1.0-1"
	version="$("$binary" --version | awk '{ print $2 }')-1"
fi
case "$version" in
[0-9]*) ;;
*) echo "$0: version '$version' does not start with a digit" >&2; exit 1 ;;
esac
arch=$(dpkg --print-architecture)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# dpkg-shlibdeps expects the tree in debian/<package>/ beside debian/control.
root=$work/debian/warden
mkdir -p "$root"

install -D -m 0755 "$binary" "$root/usr/bin/warden"
if command -v strip >/dev/null 2>&1; then
	strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/warden"
fi
install -D -m 0644 "$repo/systemd/warden-agent.service" "$root/lib/systemd/system/warden-agent.service"
install -D -m 0644 "$repo/systemd/warden-coordinator.service" "$root/lib/systemd/system/warden-coordinator.service"
# 0640: nothing in it is secret today, but it is the host's enforcement
# policy, and every warden command that reads it runs as root anyway.
install -D -m 0640 "$here/agent.toml" "$root/etc/warden/agent.toml"
doc=$root/usr/share/doc/warden
install -D -m 0644 "$repo/README.md" "$doc/README.md"
for f in security.md config.md coordinator.md workloads.md attestation.md; do
	install -m 0644 "$repo/docs/$f" "$doc/$f"
done
# Not in /etc: `warden coordinator init` writes the real one there, with its
# own join token's digest, and refuses to replace a file it did not write.
install -D -m 0644 "$here/coordinator.toml" "$doc/examples/coordinator.toml"
install -m 0644 "$here/debian/copyright" "$doc/copyright"
# Debian wants a changelog in every package; this one says where it came from.
cat <<EOF | gzip -9n >"$doc/changelog.Debian.gz"
warden ($version) unstable; urgency=medium

  * Built from the warden source tree by packaging/build-deb.sh.

 -- The Warden authors <warden@localhost>  $(date -R ${SOURCE_DATE_EPOCH:+-d @$SOURCE_DATE_EPOCH})
EOF
chmod 0644 "$doc/changelog.Debian.gz"
# The config's 0640 is deliberate (see above).
install -D -m 0644 "$here/debian/lintian-overrides" "$root/usr/share/lintian/overrides/warden"

mkdir -p "$root/DEBIAN"
for s in postinst prerm postrm; do
	install -m 0755 "$here/debian/$s" "$root/DEBIAN/$s"
done
echo /etc/warden/agent.toml >"$root/DEBIAN/conffiles"

printf 'Source: warden\n\nPackage: warden\nArchitecture: any\n' >"$work/debian/control"
shlibs=$(cd "$work" && dpkg-shlibdeps -O -e"$root/usr/bin/warden" | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "$0: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }
rm -rf "$work/debian/control"

cat >"$root/DEBIAN/control" <<EOF
Package: warden
Version: $version
Architecture: $arch
Maintainer: The Warden authors <warden@localhost>
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $shlibs, procps
Recommends: docker.io, gocryptfs, fuse3
Suggests: wireguard-tools
Section: admin
Priority: optional
Description: verifiable GPU node agent and its reference coordinator
 warden agent turns a GPU machine into a rentable node: it checks the host
 against the supplier minimums (warden doctor), runs renters' containers
 confined through Docker, ends foreign processes on leased GPUs, and streams
 signed, hash-chained attestations to a coordinator.
 .
 The package installs the binary, the warden-agent and warden-coordinator
 systemd units (only the agent's is enabled), a commented
 /etc/warden/agent.toml, and an example coordinator config
 (warden coordinator init writes the real one).
EOF

mkdir -p "$outdir"
deb="$outdir/warden_${version}_${arch}.deb"
# gzip: several times faster to build than xz, for a few MB more.
dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
echo "$deb"
