#!/usr/bin/env bash
# Exercise the cluster path on this machine: a local Ray head (`ray start --head`), the
# run submitted with `ray job submit --working-dir .`, then the head stopped again.
#   jobs/submit_local.sh [stpp-ray run arguments]
# (default: -c jobs/demo.yaml with data.root and run.output_dir made absolute, so that the
# results land in runs/job_demo here and not in the job's temporary copy of the directory).
# `ray stop` at the end stops every Ray instance of this user on this machine.
# Run it from the project root with the virtual environment's ray and stpp-ray on PATH
# (`make demo` creates .venv): the job inherits the PATH that `ray start` saw.
# RAY_PORT / DASHBOARD_PORT / NUM_CPUS choose the head's ports and CPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/ray ]; then export PATH="$PWD/.venv/bin:$PATH"; fi
RAY_PORT="${RAY_PORT:-6390}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8275}"
NUM_CPUS="${NUM_CPUS:-$(nproc)}"
ARGS=("$@")
if [ ${#ARGS[@]} -eq 0 ]; then
  ARGS=(-c jobs/demo.yaml "data.root=$PWD/data/demo" "run.output_dir=$PWD/runs/job_demo")
fi

export RAY_USAGE_STATS_ENABLED=0
ray start --head --port="$RAY_PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
  --node-ip-address=127.0.0.1 --num-cpus="$NUM_CPUS" --disable-usage-stats
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir . -- stpp-ray run "${ARGS[@]}"
