#!/usr/bin/env bash
# Takes a Debian machine with Go from nothing to a working Ember: installs
# the Debian packages, builds the binaries into ./bin and checks them.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v go >/dev/null; then
	echo "install: go is not installed; install Go 1.26 or later" >&2
	exit 1
fi

./scripts/deps.sh

mkdir -p bin
version="$(git describe --always --dirty 2>/dev/null || echo dev)"
go build -ldflags "-X main.version=$version" -o bin/ember ./cmd/ember
echo "install: built bin/ember"

./bin/ember version
./bin/ember config show
