# Sourced by scripts/test.sh: starts a throwaway PostgreSQL (Debian's
# package) in a temp dir, TLS only on its TCP port with a certificate of
# a CA made here, and exports where it is for the coordinator's tests:
#   WARDEN_TEST_POSTGRES     postgres://warden@localhost:PORT/warden
#   WARDEN_TEST_POSTGRES_CA  the CA's PEM
# It is stopped and removed when the test script exits.

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
  echo "PostgreSQL's server is not installed (Debian's postgresql)"; exit 1
fi
pg_dir=$(mktemp -d /tmp/warden-test-pg.XXXXXX)
pg_port=55432
while ss -Hltn "sport = :$pg_port" | grep -q .; do pg_port=$((pg_port + 1)); done

# The CA and the server's certificate (for localhost and 127.0.0.1).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj "/CN=warden test postgres CA" -keyout "$pg_dir/ca.key" -out "$pg_dir/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout "$pg_dir/server.key" -out "$pg_dir/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$pg_dir/san.ext"
openssl x509 -req -in "$pg_dir/server.csr" -CA "$pg_dir/ca.pem" -CAkey "$pg_dir/ca.key" \
  -CAcreateserial -days 2 -extfile "$pg_dir/san.ext" -out "$pg_dir/server.pem" 2>/dev/null
chown -R postgres: "$pg_dir"
chmod 0600 "$pg_dir/server.key"

runuser -u postgres -- "$pg_bin/initdb" -D "$pg_dir/data" -U warden -A trust >"$pg_dir/initdb.log" 2>&1 \
  || { cat "$pg_dir/initdb.log"; exit 1; }
# TCP only with TLS: a plain connection is refused by the server itself.
cat >"$pg_dir/data/pg_hba.conf" <<EOF
local   all all              trust
hostssl all all 127.0.0.1/32 trust
EOF
# fsync off: the tests check what is stored, not power loss (a bench that
# measures PostgreSQL sources this with WARDEN_TEST_PG_FSYNC=on).
runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w start -o \
  "-p $pg_port -k $pg_dir -c listen_addresses=127.0.0.1 -c ssl=on \
   -c ssl_cert_file=$pg_dir/server.pem -c ssl_key_file=$pg_dir/server.key \
   -c max_connections=300 -c fsync=${WARDEN_TEST_PG_FSYNC:-off}" >/dev/null \
  || { cat "$pg_dir/server.log"; exit 1; }
stop_postgres() {
  runuser -u postgres -- "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$pg_dir"
}
trap stop_postgres EXIT
runuser -u postgres -- "$pg_bin/createdb" -h "$pg_dir" -p "$pg_port" -U warden warden
export WARDEN_TEST_POSTGRES="postgres://warden@localhost:$pg_port/warden"
export WARDEN_TEST_POSTGRES_CA="$pg_dir/ca.pem"
echo "== PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on port $pg_port ($pg_dir)"
