#!/bin/bash
# Submit a DiffBench run as N shards (docs/scale-out/slurm.sbatch) and one merge that runs after all
# of them succeeded (shards exit 0 unless the harness failed: --diffbench-exit=harness-only).
#
#   docs/scale-out/submit-slurm.sh N RUN_DIR [more pytest options]
#
# RUN_DIR is on shared storage; the merged run is RUN_DIR/merged (`diffbench report RUN_DIR/merged`).
# When a shard fails, rerun it (slurm.sbatch's header), then merge by hand:
#   diffbench merge RUN_DIR/merged RUN_DIR/shard-*
set -euo pipefail

N="${1:?usage: submit-slurm.sh N RUN_DIR [pytest options]}"
RUN="${2:?usage: submit-slurm.sh N RUN_DIR [pytest options]}"
shift 2
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "submit-slurm.sh: N must be a positive whole number, not '$N'" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SBATCH="${SBATCH:-sbatch}"
DIFFBENCH="${DIFFBENCH:-diffbench}"

JOB=$("$SBATCH" --parsable --array="0-$((N - 1))" \
      --export="ALL,DIFFBENCH_SHARDS=$N,DIFFBENCH_RUN=$RUN" "$HERE/slurm.sbatch" "$@")
JOB="${JOB%%;*}"  # --parsable prints "jobid[;cluster]"
MERGE=$("$SBATCH" --parsable --dependency="afterok:$JOB" --job-name=diffbench-merge --ntasks=1 \
        --output="diffbench-merge-%j.out" \
        --wrap="$DIFFBENCH merge '$RUN/merged' '$RUN'/shard-*")
echo "shards: job $JOB (array 0-$((N - 1))); merge: job ${MERGE%%;*}, into $RUN/merged"
