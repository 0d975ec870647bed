#!/usr/bin/env bash
# Builds the Kubernetes control plane the tests start on loopback: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, and KWOK (which keeps fake nodes and the pods bound
# to them running), from the Go module proxy, at the versions pinned by the Go modules beside
# this script (testenv/etcd, testenv/kubernetes, testenv/kwok; they hold only version pins).
# The binaries are cached outside the clone by version, so a machine builds them once (about
# 15 minutes on 2 cores); later calls only print where they are.
#
#   testenv/build.sh            build if missing; print the directory holding the binaries
#
# The cache is $FRESHET_TESTENV_CACHE, else ~/.cache/freshet/testenv.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

pin() { awk -v m="$2" '$1 == m { print $2; exit }' "$here/$1/go.mod"; }
k8s=$(pin kubernetes k8s.io/kubernetes)
# etcd's version is that of its server module, required indirectly through the tool line
etcd=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit }' "$here/etcd/go.mod")
kwok=$(awk '$1 == "sigs.k8s.io/kwok" { print $2; exit }' "$here/kwok/go.mod")
[ -n "$k8s" ] && [ -n "$etcd" ] && [ -n "$kwok" ] || { echo "testenv: no version pins found" >&2; exit 1; }

cache=${FRESHET_TESTENV_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/freshet/testenv}
dir="$cache/kubernetes-$k8s-etcd-$etcd"
bins=(etcd kube-apiserver kube-controller-manager kube-scheduler)
# KWOK, versioned in its name, beside the control plane it was added to
kwok_bin="$dir/kwok-$kwok"
control_plane() { for b in "${bins[@]}"; do [ -x "$dir/$b" ] || return 1; done; }
complete() { control_plane && [ -x "$kwok_bin" ]; }
if complete; then
  echo "$dir"
  exit 0
fi

command -v go >/dev/null || { echo "testenv: Go is needed to build the control plane" >&2; exit 1; }
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9 # one build at a time; a second caller waits and then finds the binaries
if complete; then
  echo "$dir"
  exit 0
fi
if ! control_plane; then
  tmp=$(mktemp -d "$cache/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  minor=${k8s#v1.}
  minor=${minor%%.*}
  echo "testenv: building Kubernetes $k8s and etcd $etcd into $dir" >&2
  start=$(date +%s)
  (
    cd "$here/kubernetes"
    CGO_ENABLED=0 go build -trimpath -tags selinux,notest,grpcnotrace \
      -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$k8s \
        -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor" \
      -o "$tmp/" k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler
  )
  (
    cd "$here/etcd"
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
  )
  rm -rf "$dir"
  mv "$tmp" "$dir"
  trap - EXIT
  echo "testenv: built in $(($(date +%s) - start)) s" >&2
fi
if [ ! -x "$kwok_bin" ]; then
  echo "testenv: building KWOK $kwok into $dir" >&2
  start=$(date +%s)
  (
    cd "$here/kwok"
    CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$kwok_bin.tmp" sigs.k8s.io/kwok/cmd/kwok
  )
  mv "$kwok_bin.tmp" "$kwok_bin"
  echo "testenv: built KWOK in $(($(date +%s) - start)) s" >&2
fi
echo "$dir"
