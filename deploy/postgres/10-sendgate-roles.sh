#!/bin/sh
# Postgres image init script (compose): sendgate's owner and runtime roles
# on the first start of an empty data directory.
set -eu
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres \
  -v database="${POSTGRES_DB:-sendgate}" \
  -v owner_password="${SENDGATE_OWNER_PASSWORD:?}" \
  -v app_password="${SENDGATE_APP_PASSWORD:?}" \
  -f /docker-entrypoint-initdb.d/roles.sql.in
