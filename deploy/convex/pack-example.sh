#!/bin/sh
# Build the component, pack it, and install the tarball into the example host app, offline:
# the same `npm install <tarball>` a host app does. Run from anywhere.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
rm -rf dist example/vendor
../node_modules/.bin/tsc -p tsconfig.build.json
mkdir -p example/vendor
npm pack --silent --ignore-scripts --pack-destination example/vendor >/dev/null
cd example
rm -rf node_modules/@fondation
# --legacy-peer-deps: `convex` is the host's own dependency (here: deploy/node_modules).
npm install --silent --offline --no-audit --no-fund --legacy-peer-deps --no-package-lock
