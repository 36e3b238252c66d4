#!/usr/bin/env bash
# The Go caller: generates stubs from proto/ with protoc, protoc-gen-go and protoc-gen-go-grpc and
# builds the client tests offline in GOPATH mode against Debian's Go packages (the Go module proxy
# is not needed), then runs them against the built binary. Installs the Debian packages when they
# are missing. Usage: tests/go/run.sh path/to/cx-gateway
set -euo pipefail
binary=$(realpath "${1:?usage: run.sh path/to/cx-gateway}")
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

# golang-go 1.19, grpc-go 1.33, google.golang.org/protobuf 1.28 and github.com/golang/protobuf 1.5
# (which grpc-go 1.33 needs for its status details) as source under /usr/share/gocode.
packages=(golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc golang-google-grpc-dev
  golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev golang-google-genproto-dev)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gen="$work/src/cxgw/gen/cxgatewayv1"
mkdir -p "$gen" "$work/src/cxgw"
# The contract declares no go_package; map each file to one Go package here.
mappings=()
cd "$root/proto"
for file in cx/gateway/v1/*.proto; do
  mappings+=("--go_opt=M${file}=cxgw/gen/cxgatewayv1" "--go-grpc_opt=M${file}=cxgw/gen/cxgatewayv1")
done
protoc -I . "${mappings[@]}" --go_out="$work/src" --go-grpc_out="$work/src" cx/gateway/v1/*.proto
cp -r "$here/client" "$work/src/cxgw/client"

export GOPATH="$work:/usr/share/gocode" GO111MODULE=off GOFLAGS= GOPROXY=off
export GOCACHE="$root/target/go-build-cache"
# grpc-go before 1.40 applies a service config's retryPolicy only when asked to.
export GRPC_GO_RETRY=on
cd "$work/src/cxgw/client"
unformatted=$(gofmt -l .)
if [ -n "$unformatted" ]; then
  echo "not gofmt-formatted: ${unformatted}" >&2
  exit 1
fi
go vet .
go test -count=1 -v . -args -binary "$binary" -service-config "$root/clients/service-config.json"
