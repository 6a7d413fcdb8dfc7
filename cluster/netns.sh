#!/usr/bin/env bash
# Test hosts on this machine: a cluster of "hosts", each a network namespace with its own address in the
# benchmark range 198.18.0.0/15 (a /24 of it), its own RAY_TMPDIR and disk folder, joined by veth pairs to one bridge. The
# head host runs cluster/local.sh (a Ray head with token auth, an MLflow server, an S3 endpoint); each worker
# host a Ray node joined to it, with the head's environment (MLflow, S3), as a real cluster's nodes have.
# This machine's own namespace gets NET.254 on the bridge, so a shell here reaches every host. No route
# leads off the bridge: no traffic leaves it. Needs root and iproute2.
#
#   cluster/netns.sh start [--workers N] [--cpus C] [--head-cpus C]
#       N worker hosts [2] of C CPUs [1]; the head's Ray has --head-cpus [0] (trial drivers hold none).
#       Prints the `export` lines for submitting, as local.sh does: eval "$(cluster/netns.sh start)".
#   cluster/netns.sh add NAME [--cpus C]
#       One more worker host (a node that joins a running cluster).
#   cluster/netns.sh kill NAME
#       SIGKILL every process of a worker host (w1, w2, ...): a node lost with everything on it.
#   cluster/netns.sh hosts
#       NAME ADDRESS of each host, one per line.
#   cluster/netns.sh stop
#       Stops what start and add started, by PID, and removes the namespaces, veths and bridge.
#
# Settings (environment, defaults in brackets): STATE_DIR [/tmp/orch-netns] (short: Ray's socket paths below
# it must fit in 107 bytes), PREFIX [orch] (namespaces PREFIX-head, PREFIX-w1, ...; bridge PREFIX-br),
# NET [198.18.0] (the hosts' /24: head .1, w1 .11, w2 .12, ...; in 198.18.0.0/15 only, never a real private
# range), S3_SERVER [moto] (or weed). The Ray token is $STATE_DIR/token.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${STATE_DIR:-/tmp/orch-netns}
prefix=${PREFIX:-orch}
bridge=$prefix-br
net=${NET:-198.18.0}
head_ip=$net.1
# `start` and `add` run the project's Ray where no virtual environment is active.
if [[ -z ${VIRTUAL_ENV:-} && -x $root/.venv/bin/ray ]]; then
  export PATH="$root/.venv/bin:$PATH"
fi

log() { echo "netns.sh: $*" >&2; }
die() {
  log "$*"
  exit 1
}

[[ $net =~ ^198\.1[89]\.[0-9]+$ ]] || die "NET must be a /24 of 198.18.0.0/15 (198.18.X or 198.19.X), not $net"

# A worker host's address: w1 -> .11, w2 -> .12, ...
host_ip() { echo "$net.$((10 + ${1#w}))"; }

# A namespace PREFIX-NAME, its veth pair joined to the bridge, the address up.
make_host() {
  local name=$1 ip=$2 ns=$prefix-$1
  ip netns add "$ns"
  # veth names are at most 15 bytes: PREFIX is kept short.
  ip link add "$prefix-$name-h" type veth peer name "$prefix-$name-n"
  ip link set "$prefix-$name-n" netns "$ns"
  ip link set "$prefix-$name-h" master "$bridge" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr add "$ip/24" dev "$prefix-$name-n"
  ip -n "$ns" link set "$prefix-$name-n" up
  mkdir -p "$state/$name/disk"
}

add() {
  local name=$1 cpus=1
  shift
  while (($#)); do
    case $1 in
      --cpus) cpus=$2 && shift ;;
      *) die "unknown option $1 (usage: netns.sh add NAME [--cpus C])" ;;
    esac
    shift
  done
  [[ $name =~ ^w[0-9]+$ ]] || die "a worker host is named w1, w2, ... (not $name)"
  [[ -f $state/head/env ]] || die "no cluster in $state: netns.sh start first"
  ip netns list | grep -qw "$prefix-$name" && die "host $name exists already"
  make_host "$name" "$(host_ip "$name")"
  # The head's environment (MLflow, S3, the token), as a real cluster's nodes are set up with.
  (
    # shellcheck disable=SC1091
    source "$state/head/env"
    export RAY_TMPDIR=$state/$name RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 MLFLOW_DISABLE_TELEMETRY=true
    export AWS_EC2_METADATA_DISABLED=true RAY_AUTH_TOKEN_PATH=$state/token
    # --temp-dir: a node joining a cluster otherwise takes the head's temp dir (RAY_TMPDIR is read on the
    # head only), and on one machine the hosts would share session folders (runtime envs, logs, sockets).
    ip netns exec "$prefix-$name" setsid ray start --block --disable-usage-stats --address "$head_ip:6379" \
      --node-ip-address "$(host_ip "$name")" --num-cpus "$cpus" --temp-dir "$state/$name/ray" \
      >"$state/$name/ray.log" 2>&1 </dev/null &
    echo $! >"$state/$name/ray.pid"
  )
  # Joined when the head's GCS lists the node's address alive.
  local deadline=$((SECONDS + 120)) pid
  pid=$(<"$state/$name/ray.pid")
  until grep -q "$(host_ip "$name")" <(nodes 2>/dev/null); do
    kill -0 "$pid" 2>/dev/null || die "host $name's Ray exited while starting; its log: $state/$name/ray.log"
    ((SECONDS < deadline)) || die "host $name did not join within 120 s; its log: $state/$name/ray.log"
    sleep 0.5
  done
  log "host $name on $(host_ip "$name") joined ($cpus CPUs, Ray's folder $state/$name/ray)"
}

# The addresses of the head's alive nodes, one per line.
nodes() {
  # shellcheck disable=SC1091
  (source "$state/head/env" && curl -sf -H "Authorization: Bearer $(<"$state/token")" \
    "$RAY_API_SERVER_ADDRESS/nodes?view=summary") | python3 -c '
import json, sys
for node in json.load(sys.stdin)["data"]["summary"]:
    if node["raylet"]["state"] == "ALIVE":
        print(node["raylet"]["nodeManagerAddress"])'
}

start() {
  local workers=2 cpus=1 head_cpus=0
  while (($#)); do
    case $1 in
      --workers) workers=$2 && shift ;;
      --cpus) cpus=$2 && shift ;;
      --head-cpus) head_cpus=$2 && shift ;;
      *) die "unknown option $1 (usage: netns.sh start [--workers N] [--cpus C] [--head-cpus C])" ;;
    esac
    shift
  done
  ((EUID == 0)) || die "needs root (network namespaces)"
  command -v ip >/dev/null || die "ip not found (iproute2)"
  ip link show "$bridge" >/dev/null 2>&1 && die "bridge $bridge exists: a cluster runs (netns.sh stop)"
  umask 077
  mkdir -p "$state"
  [[ -s $state/token ]] || od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$state/token"

  ip link add "$bridge" type bridge
  ip link set "$bridge" up
  ip addr add "$net.254/24" dev "$bridge"
  make_host head "$head_ip"
  ip netns exec "$prefix-head" env STATE_DIR="$state/head" HOST_IP="$head_ip" RAY_AUTH_TOKEN_PATH="$state/token" \
    S3_SERVER="${S3_SERVER:-moto}" "$root/cluster/local.sh" start --s3 -- --num-cpus "$head_cpus" >/dev/null
  for i in $(seq "$workers"); do
    add "w$i" --cpus "$cpus"
  done
  cat "$state/head/env"
}

# SIGKILL every process in a host's namespace (Ray workers the raylet started included).
kill_host() {
  local ns=$prefix-$1 pids
  ip netns list | grep -qw "$ns" || die "no host $1 (namespace $ns)"
  pids=$(ip netns pids "$ns")
  [[ -n $pids ]] && kill -KILL $pids 2>/dev/null
  log "killed host $1 (pids: ${pids//$'\n'/ })"
}

stop() {
  local name ns pid
  for dir in "$state"/w*/; do
    [[ -d $dir ]] || continue
    name=$(basename "$dir")
    if [[ -f $dir/ray.pid ]]; then
      pid=$(<"$dir/ray.pid")
      kill -TERM "$pid" 2>/dev/null && for _ in $(seq 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.25
      done
      rm -f "$dir/ray.pid"
    fi
  done
  [[ -d $state/head ]] && STATE_DIR=$state/head "$root/cluster/local.sh" stop
  # What the services left (Ray workers of a stopped raylet), found by namespace, then the network.
  for ns in $(ip netns list | awk -v p="$prefix-" 'index($1, p) == 1 {print $1}'); do
    pid=$(ip netns pids "$ns")
    [[ -n $pid ]] && kill -KILL $pid 2>/dev/null
    ip netns del "$ns"
  done
  ip link del "$bridge" 2>/dev/null || true
  log "stopped (state kept in $state)"
}

hosts() {
  echo "head $head_ip"
  for dir in "$state"/w*/; do
    [[ -d $dir ]] && echo "$(basename "$dir") $(host_ip "$(basename "$dir")")"
  done
}

case ${1:-} in
  start) shift && start "$@" ;;
  add) shift && add "$@" ;;
  kill) kill_host "${2:?usage: netns.sh kill NAME}" ;;
  hosts) hosts ;;
  stop) stop ;;
  *) die "usage: netns.sh start [--workers N] [--cpus C] [--head-cpus C] | add NAME | kill NAME | hosts | stop" ;;
esac
