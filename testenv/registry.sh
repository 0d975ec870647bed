#!/usr/bin/env bash
# Resolves the schema registry the Avro tests start: Apicurio Registry (its Confluent-compatible
# API at /apis/ccompat/v7), the runnable distribution Maven Central publishes beside the
# application (classifier `all`), run with the machine's Java 17. Cached outside the clone by
# version, so a machine downloads it once; later calls only print the directory holding
# `apicurio-registry-app-<version>-runner.jar`.
#
#   testenv/registry.sh         resolve if missing; print the directory
#
# The cache is $FRESHET_TESTENV_CACHE, else ~/.cache/freshet/testenv.
set -euo pipefail
version=3.0.9

cache=${FRESHET_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/freshet/testenv}
dir="$cache/apicurio-registry-$version"
if [ -f "$dir/complete" ]; then
  echo "$dir"
  exit 0
fi
for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "testenv: $tool is needed for the schema registry" >&2; exit 1; }
done
mkdir -p "$cache"
exec 9>"$cache/.lock-registry"
flock 9 # one download at a time; a second caller waits and then finds the files
if [ -f "$dir/complete" ]; then
  echo "$dir"
  exit 0
fi
tmp=$(mktemp -d "$cache/.registry.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "testenv: resolving Apicurio Registry $version into $dir" >&2
start=$(date +%s)
mvn -q -B dependency:copy \
  -Dartifact="io.apicurio:apicurio-registry-app:$version:tar.gz:all" \
  -DoutputDirectory="$tmp/download" >&2
tar xzf "$tmp/download/apicurio-registry-app-$version-all.tar.gz" -C "$tmp"
rm -rf "$tmp/download"
ls "$tmp/apicurio-registry-app-$version-runner.jar" >/dev/null
touch "$tmp/complete"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "testenv: Apicurio Registry $version ready in $(($(date +%s) - start)) s" >&2
echo "$dir"
