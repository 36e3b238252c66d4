// Package client is a Go caller of cx-gateway: stubs generated from proto/ with protoc-gen-go and
// protoc-gen-go-grpc, calling the built binary on the sandbox. tests/go/run.sh builds and runs it
// offline in GOPATH mode from Debian's packages.
package client
