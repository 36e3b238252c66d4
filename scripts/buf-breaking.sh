#!/usr/bin/env bash
# The contract guard: `buf breaking` of proto/ against proto-image/cx-gateway-v1.binpb, the image
# of cx.gateway.v1 as last released, with the rules of buf.yaml (FILE). A wire- or
# source-breaking change fails here with buf's message. It also proves on every run that the guard
# bites: a scratch copy of the contract with one field renumbered must be refused.
#
# Usage:
#   scripts/buf-breaking.sh             check the contract against the released image
#   scripts/buf-breaking.sh --refresh   rebuild the image from proto/ when a release is cut
#                                       (a deliberate, reviewed change of the committed file)
set -euo pipefail
cd "$(dirname "$0")/.."

image=proto-image/cx-gateway-v1.binpb
# buf is installed (pinned) by the lint script; reuse its install step and binary.
buf_version=$(sed -n 's/^buf_version=//p' scripts/buf-lint.sh)
buf=node_modules/.bin/buf
if [ ! -x "$buf" ] || [ "$("$buf" --version 2>/dev/null)" != "$buf_version" ]; then
  echo "installing buf ${buf_version} into node_modules/" >&2
  npm install --no-save --no-audit --no-fund --loglevel=error --prefix . "@bufbuild/buf@${buf_version}" >&2
fi

if [ "${1:-}" = "--refresh" ]; then
  # Comments are left out (they do not affect compatibility), imports stay in so the image
  # resolves on its own (google/protobuf well-known types).
  "$buf" build --exclude-source-info -o "$image"
  echo "buf: wrote ${image}; commit it with the release"
  exit 0
fi

"$buf" breaking --against "$image"
echo "buf: no breaking change against ${image}"

# The guard must be able to fail: renumber GetDeliveryRequest.delivery_id in a scratch copy.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r proto buf.yaml "$scratch/"
target="$scratch/proto/cx/gateway/v1/delivery_service.proto"
sed -i '/^message GetDeliveryRequest {/,/^}/ s/string delivery_id = 1;/string delivery_id = 2;/' "$target"
if cmp -s proto/cx/gateway/v1/delivery_service.proto "$target"; then
  echo "buf: the scratch break was not applied (GetDeliveryRequest changed?)" >&2
  exit 1
fi
root=$(pwd)
if out=$(cd "$scratch" && "$root/$buf" breaking --against "$root/$image" 2>&1); then
  echo "buf: a renumbered field was NOT reported as breaking" >&2
  exit 1
fi
if ! grep -q 'Previously present field "1" with name "delivery_id" on message "GetDeliveryRequest" was deleted' <<<"$out"; then
  echo "buf: unexpected message for a renumbered field:" >&2
  echo "$out" >&2
  exit 1
fi
echo "buf: a renumbered field in a scratch copy is refused: ${out}"
