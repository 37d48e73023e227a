#!/usr/bin/env bash
# Copy the shipped plugins of the project (plugins/policies, plugins/mechanisms) into the
# chart (deploy/helm/mlsysops/files/<kind>/): Helm's .Files can only read files inside the
# chart, and the chart ships them as ConfigMaps. Run it after every change in plugins/;
# tests/test_helm.py fails while the copies differ from plugins/.
#
# Usage: deploy/helm/sync-plugins.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
chart="$root/deploy/helm/mlsysops"

for kind in policies mechanisms; do
  src="$root/plugins/$kind"
  dst="$chart/files/$kind"
  if [ -d "$src" ]; then
    # A ConfigMap is flat: a plugin is one file, and subdirectories cannot be shipped.
    subdirs="$(find "$src" -mindepth 1 -maxdepth 1 -type d ! -name '__pycache__' ! -name '.*')"
    if [ -n "$subdirs" ]; then
      echo "sync-plugins: subdirectories cannot be shipped in a ConfigMap:" >&2
      echo "$subdirs" >&2
      exit 1
    fi
  fi
  rm -rf "$dst"
  mkdir -p "$dst"
  if [ -d "$src" ]; then
    find "$src" -mindepth 1 -maxdepth 1 -type f ! -name '.*' ! -name '*.pyc' \
      -exec cp -p {} "$dst/" \;
  fi
  echo "sync-plugins: $(find "$dst" -type f | wc -l) file(s) in ${dst#"$root"/}"
done
