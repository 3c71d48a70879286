#!/usr/bin/env bash
# Make sure PostgreSQL and RabbitMQ (with its management plugin) run on this machine.
# Idempotent: services already running are left alone. Used by scripts/test.sh and scripts/up.sh.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # wait_port PORT NAME SECONDS
  for _ in $(seq 1 "$3"); do port_open "$1" && return 0; sleep 1; done
  echo "error: $2 did not come up on port $1" >&2; return 1
}

if ! port_open 5432; then
  echo "starting PostgreSQL"
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  else
    echo "error: PostgreSQL is not running on 127.0.0.1:5432 and pg_ctlcluster is not here; start it" >&2; exit 1
  fi
  wait_port 5432 PostgreSQL 60
fi

if ! port_open 5672; then
  echo "starting RabbitMQ"
  command -v rabbitmq-server >/dev/null || { echo "error: RabbitMQ is not installed (apt-get install rabbitmq-server)" >&2; exit 1; }
  rabbitmq-server -detached
  wait_port 5672 RabbitMQ 120
fi

if ! port_open 15672; then
  echo "enabling the RabbitMQ management plugin"
  rabbitmq-plugins enable rabbitmq_management >/dev/null
  wait_port 15672 "RabbitMQ management" 60
fi
