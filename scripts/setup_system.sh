#!/usr/bin/env bash
# Install the Debian packages loc2vec needs; a no-op when they are all present.
set -euo pipefail
# libtcmalloc-minimal4: the allocator loc2vec runs under (loc2vec/cli/allocator.py: a third less CPU time)
# redis-server: the Redis online store (publish.online_store: redis; `loc2vec redis start`, tests)
PKGS=(postgresql-15 postgresql-15-postgis-3 osm2pgsql osmium-tool fonts-dejavu-core python3-venv chromium libtcmalloc-minimal4 redis-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present"
  exit 0
fi
echo "system packages: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
