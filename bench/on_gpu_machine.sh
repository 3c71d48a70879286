#!/usr/bin/env bash
# The horde's API and a real worker on a lent GPU machine, end to end: jobs submitted over HTTP,
# dispatched through RabbitMQ, generated on CUDA, results stored (bench/worker_overhead.py).
#
# Such a machine has CUDA and torch but no RabbitMQ, no PostgreSQL and no package index. So:
#   bench/on_gpu_machine.sh pack   here: the horde's Python packages as cp312 wheels in .whl/ and
#                                  RabbitMQ with the Erlang it needs (its own libraries only) as
#                                  .rmq/rabbitmq.tar.xz; both are ignored by git (.git/info/exclude)
#   bench/on_gpu_machine.sh run    there (carry .whl and .rmq): install the wheels, unpack and start
#                                  RabbitMQ, then run the benchmark with the state in SQLite; results
#                                  go to $OUT (or /tmp/out)
# The run's arguments after `run` go to bench/worker_overhead.py (default: both kinds at full size,
# with and without asking ahead).
set -euo pipefail
cd "$(dirname "$0")/.."

RABBIT=rabbitmq_server-3.10.8
# Erlang and RabbitMQ applications the broker and its management plugin start (their .app files'
# dependencies, closed over); the other plugins (MQTT, STOMP, streams, federation…) stay behind.
ERLANG_APPS="asn1 compiler crypto inets kernel mnesia os_mon public_key runtime_tools sasl ssl stdlib syntax_tools tools xmerl"
RABBIT_APPS="amqp10_common amqp_client aten cowboy cowlib credentials_obfuscation cuttlefish enough gen_batch_server
jsx observer_cli osiris ra rabbit rabbit_common rabbitmq_management rabbitmq_management_agent rabbitmq_prelaunch
rabbitmq_web_dispatch ranch recon seshat stdout_formatter syslog sysmon_handler systemd"
# Versions as in the project's .venv; the GPU machine's image has torch, numpy, safetensors, pillow,
# scipy, httpx, uvloop, requests and the rest of diffusers' and transformers' needs.
WHEELS="aio-pika==10.2.1 aiormq==7.2.4 pamqp==4.0.1 pika==1.4.4 aiosqlite==0.22.1 alembic==1.20.1 Mako==1.4.3
annotated-types==0.8.0 annotated-doc==0.0.7 diffusers==0.42.1 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
httptools==0.9.0 greenlet==3.5.6 SQLAlchemy==2.1.9 orjson==3.13.0 pydantic==2.14.4 pydantic_core==2.50.5
pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5 typing_extensions==4.16.0 anyio==4.16.0
transformers==5.24.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5
importlib_metadata==10.2.0 tokenizers==0.23.3 torchsde==0.2.6 trampoline==0.1.2 click==8.5.1 h11==0.16.0
opentelemetry-api==1.45.2"

pack() {
  for ignored in /.whl/ /.rmq/; do
    grep -qx "$ignored" .git/info/exclude || echo "$ignored" >> .git/info/exclude
  done
  mkdir -p .whl .rmq
  local platforms=()
  for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${p}_x86_64")
  done
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl $WHEELS
  local rmq="$PWD/.rmq/rabbitmq.tar.xz"
  (
    cd /  # the globs name folders under /
    paths=(usr/lib/erlang/bin usr/lib/erlang/releases usr/lib/erlang/erts-* usr/lib/rabbitmq/bin
           "usr/lib/rabbitmq/lib/$RABBIT/sbin" "usr/lib/rabbitmq/lib/$RABBIT/escript")
    for app in $ERLANG_APPS; do paths+=(usr/lib/erlang/lib/"$app"-*); done
    for app in $RABBIT_APPS; do paths+=(usr/lib/rabbitmq/lib/"$RABBIT"/plugins/"$app"-*); done
    tar -cJf "$rmq" "${paths[@]}"
  )
  du -sh .whl .rmq
}

start_rabbitmq() {
  local root=/tmp/horde-rabbitmq
  mkdir -p "$root/mnesia" "$root/log"
  echo "[rabbitmq_management]." > "$root/enabled_plugins"
  : > "$root/rabbitmq-env.conf"
  printf 'listeners.tcp.local = 127.0.0.1:%s\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = %s\n' \
    "${AMQP_PORT:-5672}" "${MANAGEMENT_PORT:-15672}" > "$root/rabbitmq.conf"
  # The packaged wrapper (/usr/sbin/rabbitmq-server) switches to a `rabbitmq` user that this
  # machine does not have: run the server script itself, as root.
  HOME=${HOME:-/root} RABBITMQ_NODENAME=${RABBITMQ_NODENAME:-horde@localhost} \
  RABBITMQ_NODE_PORT=${AMQP_PORT:-5672} RABBITMQ_DIST_PORT=${DIST_PORT:-25672} \
  RABBITMQ_MNESIA_BASE="$root/mnesia" RABBITMQ_LOG_BASE="$root/log" \
  RABBITMQ_ENABLED_PLUGINS_FILE="$root/enabled_plugins" RABBITMQ_CONFIG_FILE="$root/rabbitmq.conf" \
  RABBITMQ_CONF_ENV_FILE="$root/rabbitmq-env.conf" RABBITMQ_PID_FILE="$root/rabbit.pid" \
    setsid sh -c "cd '$root' && exec /usr/lib/rabbitmq/lib/$RABBIT/sbin/rabbitmq-server" \
      > "$root/server.out" 2>&1 < /dev/null &  # in $root: a crash dump lands there, not in the checkout
  local url="http://127.0.0.1:${MANAGEMENT_PORT:-15672}/api/overview"
  for _ in $(seq 120); do
    if python3 -c "import httpx, sys; sys.exit(httpx.get('$url', auth=('guest', 'guest')).status_code != 200)" \
         2>/dev/null; then
      echo "RabbitMQ is up"
      return 0
    fi
    sleep 1
  done
  echo "error: RabbitMQ did not start:" >&2
  tail -40 "$root/server.out" >&2
  return 1
}

run() {
  local out=${OUT:-/tmp/out}
  mkdir -p "$out"
  if [ "${WHEELS_DIR-.whl}" ]; then  # WHEELS_DIR= (empty): the packages are installed already
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "${WHEELS_DIR:-.whl}"/*.whl
  fi
  export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  export PATH="/usr/lib/erlang/bin:$PATH"  # the server script runs `erl`; the packages link it from /usr/bin
  if [ ! -d "/usr/lib/rabbitmq/lib/$RABBIT" ]; then
    tar -xJf .rmq/rabbitmq.tar.xz -C / 2>/dev/null || python3 -c \
      "import tarfile; tarfile.open('.rmq/rabbitmq.tar.xz').extractall('/', filter='fully_trusted')"
  fi
  # The node is named after localhost, which must resolve.
  getent hosts localhost > /dev/null || echo "127.0.0.1 localhost" >> /etc/hosts
  start_rabbitmq
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  if [ $# -gt 0 ]; then
    python3 bench/worker_overhead.py "$@"
  else
    local common=(--size full --device cuda --database sqlite --jobs 60 --runs 1 --models-dir /tmp/horde-models)
    python3 bench/worker_overhead.py "${common[@]}" --json "$out/ahead.json"
    python3 bench/worker_overhead.py "${common[@]}" --no-claim-ahead --json "$out/no-ahead.json"
  fi
}

case "${1:-}" in
  pack) pack ;;
  run) shift; run "$@" ;;
  *) echo "usage: bench/on_gpu_machine.sh pack | run [bench/worker_overhead.py arguments]" >&2; exit 2 ;;
esac
