#!/bin/bash
@@SBATCH@@
#
# Written by `orchestrator submit --slurm` for sweep @@NAME@@ (digest @@DIGEST@@); edit freely.
# Submit it with:  sbatch @@SCRIPT@@
#
# In the allocation: a Ray head on the first node, a Ray worker on each other node (srun), then
# `orchestrator sweep` against that cluster on the first node. On exit the Ray processes this
# script started, and only those, are stopped (never `ray stop`, which would stop every Ray
# instance of your user on the node).
#
# The environment at `sbatch` time is passed on (Slurm's default --export=ALL): MLFLOW_TRACKING_URI,
# an MLflow server the compute nodes reach, and the MLflow credentials come from there; none is
# written here. Optional settings, from the environment:
#   ORCHESTRATOR_RAY_PORT        the head's GCS port (default 6379)
#   ORCHESTRATOR_RAY_TMPDIR      Ray's temp dir on each node (default /tmp/ray-$SLURM_JOB_ID; keep it short)
#   ORCHESTRATOR_DASHBOARD_PORT  start the Ray dashboard on the head, on 127.0.0.1:PORT (default: none)
#   ORCHESTRATOR_HEAD_IP         the head's address as the other nodes reach it (default: resolved)
#   ORCHESTRATOR_RAY_START_ARGS  more arguments for every `ray start` (split on spaces)
#   ORCHESTRATOR_RAY_TIMEOUT     seconds to wait for the Ray head (default 300)
#   RAY_AUTH_MODE=disabled       no token authentication for this job's Ray cluster
set -eo pipefail

cd @@WORKDIR@@
# the environment `orchestrator submit` ran in (its python and ray), when the nodes have it
if [ -x @@BINDIR@@/ray ]; then PATH=@@BINDIR@@:"$PATH"; export PATH; fi
export PYTHONUNBUFFERED=1

: "${SLURM_JOB_NODELIST:?is not set: submit this script with sbatch}"
SWEEP_FILE=@@FILE@@
GPUS_PER_NODE=@@GPUS@@
RAY_PORT="${ORCHESTRATOR_RAY_PORT:-6379}"
RAY_TMPDIR="${ORCHESTRATOR_RAY_TMPDIR:-/tmp/ray-${SLURM_JOB_ID:-$$}}"
NUM_CPUS="${SLURM_CPUS_ON_NODE:-@@CPUS@@}"
read -r -a EXTRA_ARGS <<< "${ORCHESTRATOR_RAY_START_ARGS:-}"

# Token authentication, so that other users on the cluster network cannot use this job's Ray: your
# token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) when you have one, else a new one
# for this job only. Every `ray` command and srun step below inherits the mode and the token.
if [ "${RAY_AUTH_MODE:-}" != disabled ]; then
    export RAY_AUTH_MODE=token
    if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
        RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')
        export RAY_AUTH_TOKEN
    fi
fi

if command -v scontrol >/dev/null 2>&1; then
    mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
else
    case "$SLURM_JOB_NODELIST" in
        *"["*) echo "orchestrator: scontrol is needed to expand the node list $SLURM_JOB_NODELIST" >&2; exit 1 ;;
    esac
    IFS=, read -r -a NODES <<< "$SLURM_JOB_NODELIST"
fi
NUM_NODES=${#NODES[@]}
HEAD_NODE=${NODES[0]:-}
if [ -z "$HEAD_NODE" ]; then
    echo "orchestrator: no node in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 1
fi
if [ "$NUM_NODES" -gt 1 ] && ! command -v srun >/dev/null 2>&1; then
    echo "orchestrator: srun is needed to start Ray on $NUM_NODES nodes" >&2; exit 1
fi

HEAD_IP="${ORCHESTRATOR_HEAD_IP:-}"
if [ -z "$HEAD_IP" ]; then
    HEAD_IP=$(getent ahostsv4 "$HEAD_NODE" 2>/dev/null | awk 'NR == 1 {print $1}') || HEAD_IP=
fi
if [ -z "$HEAD_IP" ]; then
    HEAD_IP=$(hostname --ip-address | awk '{print $1}')
fi
if [ "$NUM_NODES" -gt 1 ]; then
    case "$HEAD_IP" in
        127.*|::1) echo "orchestrator: $HEAD_NODE resolves to the loopback address $HEAD_IP, which the other" \
                        "nodes cannot reach; set ORCHESTRATOR_HEAD_IP" >&2; exit 1 ;;
    esac
    case "${MLFLOW_TRACKING_URI:-}" in
        "") echo "orchestrator: MLFLOW_TRACKING_URI is not set: with several nodes, export the URI of an MLflow" \
                 "server every node reaches before sbatch" >&2; exit 2 ;;
        *://127.*|*://localhost*|*://*@127.*|*://*@localhost*|*://\[::1\]*)
            echo "orchestrator: MLFLOW_TRACKING_URI is a loopback address, which the other nodes cannot reach" >&2
            exit 2 ;;
    esac
fi
RAY_HEAD="$HEAD_IP:$RAY_PORT"

RAY_PIDS=()
# shellcheck disable=SC2317  # stop_ray runs from the EXIT trap below, which shellcheck does not follow
stop_ray() {
    local status=$?
    trap - EXIT INT TERM
    if [ "${#RAY_PIDS[@]}" -gt 0 ]; then
        echo "orchestrator: stopping the Ray processes this job started"
        kill -TERM "${RAY_PIDS[@]}" 2>/dev/null || true
        local waited=0 pid alive
        while [ "$waited" -lt 60 ]; do
            alive=0
            for pid in "${RAY_PIDS[@]}"; do
                if kill -0 "$pid" 2>/dev/null; then alive=1; fi
            done
            if [ "$alive" -eq 0 ]; then break; fi
            sleep 1
            waited=$((waited + 1))
        done
        kill -KILL "${RAY_PIDS[@]}" 2>/dev/null || true
        wait 2>/dev/null || true
    fi
    exit "$status"
}
trap stop_ray EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

HEAD_ARGS=(--head --node-ip-address="$HEAD_IP" --port="$RAY_PORT" --num-cpus="$NUM_CPUS"
           --num-gpus="$GPUS_PER_NODE" --temp-dir="$RAY_TMPDIR")
if [ -n "${ORCHESTRATOR_DASHBOARD_PORT:-}" ]; then
    HEAD_ARGS+=(--include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$ORCHESTRATOR_DASHBOARD_PORT")
else
    HEAD_ARGS+=(--include-dashboard=false)
fi
echo "orchestrator: starting the Ray head on $HEAD_NODE ($RAY_HEAD), $NUM_NODES node(s)"
if [ "$NUM_NODES" -gt 1 ]; then
    srun --nodes=1 --ntasks=1 --cpus-per-task="$NUM_CPUS" -w "$HEAD_NODE" \
        ray start "${HEAD_ARGS[@]}" "${EXTRA_ARGS[@]}" --block &
else
    ray start "${HEAD_ARGS[@]}" "${EXTRA_ARGS[@]}" --block &
fi
RAY_PIDS+=("$!")

deadline=$((SECONDS + ${ORCHESTRATOR_RAY_TIMEOUT:-300}))
until ray status --address="$RAY_HEAD" >/dev/null 2>&1; do
    if ! kill -0 "${RAY_PIDS[0]}" 2>/dev/null; then
        echo "orchestrator: the Ray head exited; its logs are in $RAY_TMPDIR/session_latest/logs on $HEAD_NODE" >&2
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "orchestrator: the Ray head at $RAY_HEAD did not answer in time" >&2; exit 1
    fi
    sleep 2
done

for node in "${NODES[@]:1}"; do
    echo "orchestrator: starting a Ray worker on $node"
    srun --nodes=1 --ntasks=1 --cpus-per-task="$NUM_CPUS" -w "$node" \
        ray start --address="$RAY_HEAD" --num-cpus="$NUM_CPUS" --num-gpus="$GPUS_PER_NODE" \
        --temp-dir="$RAY_TMPDIR" "${EXTRA_ARGS[@]}" --block &
    RAY_PIDS+=("$!")
done
if [ "$NUM_NODES" -gt 1 ]; then
    deadline=$((SECONDS + ${ORCHESTRATOR_RAY_TIMEOUT:-300}))
    until [ "$(ray status --address="$RAY_HEAD" 2>/dev/null | grep -cE '^ *[0-9]+ node_' || true)" -ge "$NUM_NODES" ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "orchestrator: not every node joined in time; running the sweep on those that did" >&2; break
        fi
        sleep 5
    done
fi

echo "orchestrator: running the sweep on the Ray cluster at $RAY_HEAD"
set +e
python -m orchestrator sweep "$SWEEP_FILE" @@OVERRIDES@@--address "$RAY_HEAD"
status=$?
set -e
exit "$status"
