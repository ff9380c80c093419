#!/usr/bin/env bash
# Runs every check CI runs: dependencies, go vet, staticcheck, the test
# suite under the race detector, and a short run of every fuzz target.
#
# Environment:
#   EMBER_FUZZTIME          time per fuzz target (default 10s; 0 skips fuzzing)
#   EMBER_FIRECRACKER_BIN   a Firecracker binary for the real-Firecracker tests
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v go >/dev/null; then
	echo "test: go is not installed; install Go 1.26 or later" >&2
	exit 1
fi

./scripts/deps.sh

gobin="$(go env GOPATH)/bin"
if ! "$gobin/staticcheck" -version 2>/dev/null | grep -q "0.8.2"; then
	echo "test: installing staticcheck"
	go install honnef.co/go/tools/cmd/staticcheck@v0.8.2
fi

echo "== go vet"
go vet ./...
echo "== staticcheck"
"$gobin/staticcheck" ./...

# The end-to-end tests boot a real guest: build the agent and the guest
# bundle once (a rebuild with unchanged inputs is a no-op) and point the
# tests at it.
cache="${EMBER_TEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ember-test}"
mkdir -p "$cache/bin"
echo "== guest bundle in $cache/bundle"
CGO_ENABLED=0 go build -o "$cache/bin/ember-agent" ./cmd/ember-agent
go build -o "$cache/bin/ember" ./cmd/ember
EMBER_STATE_DIR="$cache/state" "$cache/bin/ember" image build --dir "$cache/bundle" --agent "$cache/bin/ember-agent"
export EMBER_TEST_BUNDLE="$cache/bundle"
# The qemu agent tests run uname and true from the bundle's busybox root.
export EMBER_TEST_AGENT_BOOT_ARGS="ember.mode=switchroot ember.rootflags=ro"

echo "== go test -race"
go test -race -count=1 -timeout 60m ./...

fuzztime="${EMBER_FUZZTIME:-10s}"
if [ "$fuzztime" != "0" ]; then
	echo "== fuzz ($fuzztime per target)"
	# Each line is "<package dir> <target>".
	grep -rIl --include='*_test.go' '^func Fuzz' . | while read -r file; do
		dir="./$(dirname "${file#./}")"
		grep -o '^func Fuzz[A-Za-z0-9_]*' "$file" | sed 's/^func //' | while read -r target; do
			echo "$dir $target"
		done
	done | sort -u | while read -r dir target; do
		echo "-- $target in $dir"
		# go test -fuzz can end a healthy run with "context deadline
		# exceeded" when a worker is slow on a loaded machine, so a failed
		# target runs once more. A real finding is saved under testdata/fuzz
		# and fails the second run too.
		go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$dir" ||
			go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" "$dir"
	done
fi
echo "test: all checks passed"
