#!/usr/bin/env bash
# Installs the Debian packages the test suite starts real servers from: OpenLDAP's slapd and
# ldap-utils (tests/fixtures/slapd.py), PostgreSQL (initdb, for the database tests) and
# Prometheus with promtool (tests/fixtures/prometheus.py, the Grafana dashboard check), and
# wrk for bench/audit_overhead.py.
# Idempotent and quiet when everything is present; `apt-get update` runs only when something
# is missing. Debian 12 / Ubuntu; run as root or with sudo. `--dry-run` prints the plan only.
set -euo pipefail

dry_run=0
case "${1:-}" in
  --dry-run) dry_run=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

is_installed() {
  [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

has_initdb() {
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

missing=()
for package in slapd ldap-utils prometheus wrk; do
  is_installed "$package" || missing+=("$package")
done
has_initdb || missing+=(postgresql)

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "install-test-deps: installing ${missing[*]}"
if ((dry_run)); then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install-test-deps: no apt-get here; install ${missing[*]} by hand" >&2
  exit 1
fi

sudo=()
if ((EUID != 0)); then
  if ! command -v sudo >/dev/null; then
    echo "install-test-deps: run as root (or install sudo) to install ${missing[*]}" >&2
    exit 1
  fi
  sudo=(sudo)
fi

# The packages' maintainer scripts would start a system slapd and a PostgreSQL cluster on
# the standard ports; the tests start their own, so forbid service starts (exit 101) while
# installing, unless the machine already has a policy (Docker images often do).
policy=/usr/sbin/policy-rc.d
if [[ ! -e "$policy" ]]; then
  "${sudo[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
  trap '"${sudo[@]}" rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-test-deps: done"
