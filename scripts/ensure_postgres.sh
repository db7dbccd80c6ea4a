#!/usr/bin/env bash
# Ensures a local PostgreSQL server runs and writes var/postgres.env with PAYLATER_TEST_PG_URL.
# Installs Debian's postgresql when missing. Uses a password from var/ (generated, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p var
pw_file=var/postgres.password
[ -s "$pw_file" ] || (head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$pw_file")
pw=$(cat "$pw_file")
port=${PAYLATER_PG_PORT:-5432}

if ! command -v pg_ctlcluster >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "installing PostgreSQL from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
fi

if ! pg_isready -q -h 127.0.0.1 -p "$port"; then
  cluster=$(pg_lsclusters -h | awk 'NR==1 {print $1" "$2}')
  if [ -z "$cluster" ]; then
    ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
    pg_createcluster "$ver" main >/dev/null
    cluster="$ver main"
  fi
  pg_ctlcluster $cluster start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.5; done
fi

su postgres -c "psql -q -p $port -c \"ALTER USER postgres PASSWORD '$pw'\"" >/dev/null
echo "export PAYLATER_TEST_PG_URL=postgresql://postgres:$pw@127.0.0.1:$port/postgres" > var/postgres.env
echo "PostgreSQL ready on 127.0.0.1:$port"
