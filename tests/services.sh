#!/usr/bin/env bash
# Start the RabbitMQ and Redis the tests talk to, if they are not already answering on loopback.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

need_pkg() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing $2 from Debian packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    echo "error: $1 is not installed and cannot be installed here; install $2" >&2
    exit 1
  fi
}

if ! port_open 6379; then
  need_pkg redis-server redis-server
  echo "starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

if ! port_open 5672; then
  need_pkg rabbitmq-server rabbitmq-server
  echo "starting rabbitmq-server on 127.0.0.1:5672"
  rabbitmq-server -detached
  rabbitmqctl await_startup --timeout 120 >/dev/null 2>&1 || true
fi

for i in $(seq 1 120); do
  port_open 6379 && port_open 5672 && exit 0
  sleep 1
done
echo "error: RabbitMQ (5672) or Redis (6379) did not come up" >&2
exit 1
