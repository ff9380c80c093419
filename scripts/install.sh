#!/usr/bin/env bash
# Takes a Debian 12 machine with Go from nothing to Ember's main job
# running: installs the Debian packages, builds bin/ember and
# bin/ember-agent, builds the guest image from Debian's cloud kernel and
# runs `ember run`, which boots, snapshots and clones a real VM.
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
CGO_ENABLED=0 go build -ldflags "-s -w -X main.version=$version" -o bin/ember-agent ./cmd/ember-agent
echo "install: built bin/ember and bin/ember-agent"

./bin/ember version
./bin/ember image build
./bin/ember run
