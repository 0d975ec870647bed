#!/usr/bin/env bash
# Resolves the Apache Kafka broker the Kafka tests start (one combined KRaft node on loopback)
# from Maven Central, at the versions pinned in testenv/kafka/pom.xml, with the machine's Java.
# The jars are cached outside the clone by the pom's content, so a machine downloads them once;
# later calls only print where they are.
#
#   testenv/kafka.sh            resolve if missing; print the directory holding the jars
#
# The cache is $FRESHET_TESTENV_CACHE, else ~/.cache/freshet/testenv.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pom="$here/kafka/pom.xml"
version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")
[ -n "$version" ] || { echo "testenv: no Kafka version pin in $pom" >&2; exit 1; }
digest=$(sha256sum "$pom" | cut -c1-12)

cache=${FRESHET_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/freshet/testenv}
dir="$cache/kafka-$version-$digest"
if [ -f "$dir/complete" ]; then
  echo "$dir"
  exit 0
fi
for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "testenv: $tool is needed for the Kafka broker" >&2; exit 1; }
done
mkdir -p "$cache"
exec 9>"$cache/.lock-kafka"
flock 9 # one download at a time; a second caller waits and then finds the jars
if [ -f "$dir/complete" ]; then
  echo "$dir"
  exit 0
fi
tmp=$(mktemp -d "$cache/.kafka.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "testenv: resolving Apache Kafka $version into $dir" >&2
start=$(date +%s)
mvn -q -B -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
  -DoutputDirectory="$tmp/libs" >&2
# the broker's entry points are inside kafka_2.13: check they are there before caching
ls "$tmp/libs"/kafka_2.13-"$version".jar >/dev/null
touch "$tmp/complete"
rm -rf "$dir"
mv "$tmp" "$dir"
trap - EXIT
echo "testenv: Kafka $version ready in $(($(date +%s) - start)) s" >&2
echo "$dir"
