#!/usr/bin/env bash
# Regenerates tests/data/tokenizer/{qwen3,llama3}_expected.jsonl and *-tokenizer.tar.xz:
# installs the exact versions pinned in package.json into a temporary folder (nothing lands
# in the repository), then runs gen.mjs. Needs node >= 18, npm, tar and xz.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/distilx-tokref.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cp "$here/package.json" "$work/"
(cd "$work" && npm install --no-audit --no-fund --ignore-scripts --loglevel=error)
TOKREF_NODE_MODULES="$work/node_modules" node "$here/gen.mjs"
