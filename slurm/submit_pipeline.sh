#!/bin/bash
# Submit the whole DoReMi pipeline as four chained jobs; prints one line per job: "stage job_id".
#   preprocess -> reference -> proxy -> main    (each starts only once the previous one COMPLETED: afterok)
#
#   CONFIG=configs/tiny/main.yaml WORK_DIR=runs/doremi slurm/submit_pipeline.sh
#   slurm/submit_pipeline.sh --partition=gpu --account=myproject     # extra arguments go to every sbatch
#
# Configure with environment variables (defaults in brackets); the jobs get them through sbatch --export:
#   MEGADOREMI_ROOT      repository checkout [the directory holding this script's slurm/]
#   VENV                 virtualenv [$MEGADOREMI_ROOT/.venv]
#   CONFIG               experiment YAML for all three trainings [configs/tiny/main.yaml]; its data.domains must
#                        name DATA_DIR/<domain>_text_document, the preprocessing outputs
#   REFERENCE_CONFIG, PROXY_CONFIG, MAIN_CONFIG   per-stage YAMLs [CONFIG]
#   WORK_DIR             run directories WORK_DIR/{reference,proxy,main} [runs/doremi]
#   CORPUS_DIR, TOKENIZER_MODEL, DATA_DIR, PREPROCESS_LAUNCHER   as in slurm/preprocess.sbatch
#   SKIP_PREPROCESS=1    start at the reference (datasets already made)
#   EXTRA_ARGS           overrides for every training; REFERENCE_ARGS, PROXY_ARGS, MAIN_ARGS per stage
#   REFERENCE_LOSSES     proxy: reference-loss cache prefix (empty: live reference) []
#   LOG_DIR              job logs [runs/logs, created]; each sbatch's --output is LOG_DIR/%x-%j.log
# Relative paths are relative to the directory this script is run from (the jobs run there too).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export MEGADOREMI_ROOT=${MEGADOREMI_ROOT:-$(dirname "$SCRIPT_DIR")}
export VENV=${VENV-$MEGADOREMI_ROOT/.venv}
CONFIG=${CONFIG:-configs/tiny/main.yaml}
WORK_DIR=${WORK_DIR:-runs/doremi}
LOG_DIR=${LOG_DIR:-runs/logs}
EXTRA_ARGS=${EXTRA_ARGS:-}

command -v sbatch >/dev/null || { echo "submit_pipeline.sh: sbatch not found (run on a Slurm login node)" >&2; exit 1; }
mkdir -p "$LOG_DIR"

# submit NAME DEPENDENCY SCRIPT VAR=VALUE...: sbatch with the pipeline's variables exported; prints the job id.
submit() {
    local name=$1 dependency=$2 script=$3
    shift 3
    local -a args=(--parsable "--output=$LOG_DIR/%x-%j.log")
    if [[ -n "$dependency" ]]; then
        args+=("--dependency=afterok:$dependency" --kill-on-invalid-dep=yes)  # a failed stage cancels the rest
    fi
    # --export=ALL keeps the caller's environment (PATH, site variables); the named values override it.
    # Values go through the environment (not the comma-separated --export list) so they may contain commas.
    local id
    id=$(env "$@" sbatch "${args[@]}" "${SBATCH_EXTRA[@]}" --export=ALL "$MEGADOREMI_ROOT/slurm/$script")
    id=${id%%;*}  # "id;cluster" on multi-cluster installations
    echo "$name $id"
    LAST_JOB=$id
}

SBATCH_EXTRA=("$@")
LAST_JOB=""
if [[ "${SKIP_PREPROCESS:-0}" != 1 ]]; then
    submit preprocess "" preprocess.sbatch \
        "CORPUS_DIR=${CORPUS_DIR:-demo_workdir/corpus}" \
        "TOKENIZER_MODEL=${TOKENIZER_MODEL:-demo_workdir/tokenizer.model}" \
        "DATA_DIR=${DATA_DIR:-demo_workdir/data}" "PREPROCESS_LAUNCHER=${PREPROCESS_LAUNCHER:-srun}"
fi
submit reference "$LAST_JOB" reference.sbatch \
    "CONFIG=${REFERENCE_CONFIG:-$CONFIG}" "RUN_DIR=$WORK_DIR/reference" \
    "EXTRA_ARGS=$EXTRA_ARGS ${REFERENCE_ARGS:-}"
submit proxy "$LAST_JOB" proxy.sbatch \
    "CONFIG=${PROXY_CONFIG:-$CONFIG}" "RUN_DIR=$WORK_DIR/proxy" "REFERENCE_RUN_DIR=$WORK_DIR/reference" \
    "REFERENCE_LOSSES=${REFERENCE_LOSSES:-}" "EXTRA_ARGS=$EXTRA_ARGS ${PROXY_ARGS:-}"
submit main "$LAST_JOB" main.sbatch \
    "CONFIG=${MAIN_CONFIG:-$CONFIG}" "RUN_DIR=$WORK_DIR/main" "PROXY_RUN_DIR=$WORK_DIR/proxy" \
    "WEIGHTS=$WORK_DIR/proxy/domain_weights.json" "EXTRA_ARGS=$EXTRA_ARGS ${MAIN_ARGS:-}"
