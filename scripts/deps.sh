#!/usr/bin/env bash
# Installs the Debian packages Ember and its tests use, when any is missing.
# Needs root (or sudo) the first time; later runs only check.
set -euo pipefail

packages=(
	qemu-system-x86 # QEMU microvm backend and the end-to-end tests
	e2fsprogs       # mkfs.ext4 -d builds guest root filesystems
	busybox-static  # the default guest root filesystem
	nftables        # egress firewall tests
	iproute2        # ip netns for the network tests
	ca-certificates # apt-get download of the guest kernel
	xz-utils        # test fixtures of the image builder
	bzip2           # test fixtures of the image builder
)

missing=()
for p in "${packages[@]}"; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
		missing+=("$p")
	fi
done
sudo=""
if [ "$(id -u)" -ne 0 ]; then
	sudo="sudo"
fi

# ember image build resolves Debian's cloud kernel with apt-cache, which
# needs package lists; a fresh machine may have none.
if [ ${#missing[@]} -gt 0 ] || ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; then
	echo "deps: updating the package lists"
	$sudo apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
	echo "deps: installing ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
