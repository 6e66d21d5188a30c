# Shared by ops/run and ops/test: make sure PostgreSQL and RabbitMQ are installed and running on
# this machine, and that the C libraries the build links against are there. Debian packages only.
# Everything here is idempotent: on a machine where all is in place it only checks.

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_build_deps() {
  local missing=()
  dpkg -s libpq-dev >/dev/null 2>&1 || missing+=(libpq-dev)
  dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
  command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
  command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing build dependencies: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not installed: install Rust (https://rustup.rs) and run this again" >&2
    exit 1
  fi
}

pg_ok() { psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; }

ensure_postgres() {
  if ! command -v pg_lsclusters >/dev/null 2>&1; then
    log "installing PostgreSQL"
    apt_install postgresql postgresql-client
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if ! pg_lsclusters -h | awk '{print $4}' | grep -q online; then
    log "starting PostgreSQL $version"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  fi
  for _ in $(seq 1 50); do pg_ok && break; sleep 0.2; done
  if ! pg_ok; then
    # A fresh Debian cluster asks for a password on TCP: trust loopback, as the development
    # setup assumes (user postgres, no password, 127.0.0.1 only).
    log "allowing trusted local connections to PostgreSQL (loopback only)"
    local hba=/etc/postgresql/$version/main/pg_hba.conf
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    for _ in $(seq 1 50); do pg_ok && break; sleep 0.2; done
  fi
  pg_ok || { echo "PostgreSQL does not answer on 127.0.0.1:5432 as user postgres" >&2; exit 1; }
}

rabbit_ok() { as_root rabbitmqctl -q status >/dev/null 2>&1; }

ensure_rabbitmq() {
  if ! command -v rabbitmqctl >/dev/null 2>&1; then
    log "installing RabbitMQ"
    apt_install rabbitmq-server
  fi
  if ! rabbit_ok; then
    log "starting RabbitMQ"
    as_root rabbitmq-server -detached
  fi
  # `rabbitmq-server -detached` returns before the node has registered with epmd, and until it has,
  # `await_startup` fails at once ("node 'rabbit' not running at all", exit 69) instead of waiting.
  # So ask again until the node exists and has started, within one deadline.
  local deadline=$((SECONDS + 120)) error
  until error=$(as_root rabbitmqctl -q await_startup --timeout 120 2>&1 >/dev/null); do
    if ((SECONDS >= deadline)); then
      echo "RabbitMQ did not start within 120 s: $error" >&2
      return 1
    fi
    sleep 1
  done
  # A broker restarted with `stop_app` stays down until `start_app`.
  as_root rabbitmqctl -q start_app >/dev/null 2>&1 || true
}

ensure_services() {
  ensure_build_deps
  ensure_postgres
  ensure_rabbitmq
}
