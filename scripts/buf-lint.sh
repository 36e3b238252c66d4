#!/usr/bin/env bash
# Lints the protobuf contract (buf.yaml, module `proto`) and checks that it is buf-formatted.
# buf comes from npm (@bufbuild/buf ships a prebuilt binary) and is installed into the gitignored
# node_modules/ of the repository on first use, so no global install is needed.
# Set BUF_BREAKING_AGAINST (e.g. '.git#branch=main') to also check for breaking changes.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned so every machine lints with the same rules; bump deliberately.
buf_version=1.75.0
buf=node_modules/.bin/buf

if [ ! -x "$buf" ] || [ "$("$buf" --version 2>/dev/null)" != "$buf_version" ]; then
  echo "installing buf ${buf_version} into node_modules/" >&2
  npm install --no-save --no-audit --no-fund --loglevel=error --prefix . "@bufbuild/buf@${buf_version}" >&2
fi

"$buf" lint
"$buf" format --diff --exit-code
if [ -n "${BUF_BREAKING_AGAINST:-}" ]; then
  "$buf" breaking --against "$BUF_BREAKING_AGAINST"
fi
echo "buf: contract lint clean"
