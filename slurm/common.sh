# Sourced by every slurm/*.sbatch script after its user-editable variables: venv, threads, rendezvous, and the
# launch helpers (run_training, run_python_step, make_deepspeed_hostfile). See docs/slurm.md.
#
# Variables (set at the top of the sbatch script, or export them / pass sbatch --export=ALL,NAME=value):
#   MEGADOREMI_ROOT   repository checkout (default: the directory sbatch was run from)
#   VENV              virtualenv to activate (default: $MEGADOREMI_ROOT/.venv; empty: use python from PATH)
#   CONFIG, RUN_DIR   experiment YAML and run directory (RUN_DIR empty: the config's run_dir)
#   EXTRA_ARGS        more overrides, shell-quoted as on a command line: "--train.steps=2000 --model.preset=70m"
#   TRAIN_LAUNCHER    srun (default: one task per rank) | deepspeed (DeepSpeed's launcher from the batch script,
#                     pdsh over passwordless ssh to every node of the job; no requeue on SIGUSR1, see below)
#   TRAIN_SRUN_ARGS   srun options for training steps (default --mpi=none: ranks come from SLURM_* variables;
#                     a site MpiDefault=pmix would otherwise make every task look like an MPI singleton)
#   DEEPSPEED_ARGS    more options for the deepspeed launcher (TRAIN_LAUNCHER=deepspeed): "--ssh_port 2222"
#   OMP_NUM_THREADS   default: --cpus-per-task, else 1
#   MASTER_ADDR/PORT  default: first host of the job, 20000 + job id mod 20000 (a requeued job keeps its id)
#
# Relative paths (CONFIG, RUN_DIR, paths inside the config) are relative to the job's working directory: the
# directory sbatch was run from, unless sbatch --chdir says otherwise.

set -euo pipefail

# Exit status of megadoremi.train after a SIGUSR1/SIGTERM checkpoint (EXIT_REQUEUE in megadoremi/train/__main__.py).
readonly EXIT_REQUEUE=75
# srun's status when the tasks died of SIGUSR1 (128 + 10): the signal came before the program could handle it
# (still starting up, or a tool that does not handle it); the job is requeued all the same.
readonly EXIT_KILLED_BY_USR1=138

MEGADOREMI_ROOT=${MEGADOREMI_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
VENV=${VENV-$MEGADOREMI_ROOT/.venv}
EXTRA_ARGS=${EXTRA_ARGS:-}
TRAIN_SRUN_ARGS=${TRAIN_SRUN_ARGS:---mpi=none}
TRAIN_LAUNCHER=${TRAIN_LAUNCHER:-srun}
DEEPSPEED_ARGS=${DEEPSPEED_ARGS:-}

die() {
    echo "slurm/common.sh: $*" >&2
    exit 1
}

if [[ -n "$VENV" ]]; then
    [[ -f "$VENV/bin/activate" ]] ||
        die "VENV=$VENV is not a virtualenv (no bin/activate); set VENV= to use python from PATH"
    set +u  # activate scripts read unset variables
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    set -u
fi
command -v python >/dev/null || die "no python on PATH (VENV=$VENV)"
command -v srun >/dev/null || die "srun not found: these scripts run inside a Slurm allocation"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
    MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
fi
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

# The batch shell itself is only signalled by `scancel --full` / `--signal=B:USR1@...`; bash's default action
# for SIGUSR1 is to die, which would fail the job. The trap runs once srun returns (bash waits for it).
trap 'echo "$(date "+%F %T") batch shell: SIGUSR1 (the training tasks checkpoint and stop)"' USR1

# split_words NAME STRING: the shell words of STRING (quotes respected, like a command line) into array NAME.
split_words() {
    eval "$1=($2)"
}

log() {
    echo "$(date "+%F %T") [job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"
}

# requeue_job REASON: put this job back in the queue (same id, same log with --open-mode=append) and end this run.
# Slurm kills the batch script while requeueing; `exit 0` covers the moments before that.
requeue_job() {
    log "$1: requeueing job ${SLURM_JOB_ID:?}"
    scontrol requeue "$SLURM_JOB_ID" ||
        die "scontrol requeue $SLURM_JOB_ID failed (cancelled meanwhile, or submitted with --no-requeue?)"
    exit 0
}

# run_training [OVERRIDE ...]: one srun step, one task per GPU (CPU: per task), on $CONFIG and $RUN_DIR; with
# TRAIN_LAUNCHER=deepspeed, DeepSpeed's launcher from a hostfile of the job's nodes instead (make_deepspeed_hostfile).
# Exit 75 (checkpointed after SIGUSR1/SIGTERM, not finished) requeues the job; the next run resumes from the
# newest complete checkpoint (--resume auto). Any other failure is returned to the caller (set -e: the job fails).
run_training() {
    [[ -n "${CONFIG:-}" ]] || die "CONFIG is not set (the experiment YAML)"
    [[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG: no such file (relative to $PWD)"
    local -a srun_args extra ds_args run_dir=()
    split_words srun_args "$TRAIN_SRUN_ARGS"
    split_words extra "$EXTRA_ARGS"
    if [[ -n "${RUN_DIR:-}" ]]; then
        run_dir=("--run_dir=$RUN_DIR")
    fi
    local status=0 hostfile envfile user_env
    log "training: $CONFIG ${run_dir[*]} ${extra[*]} $* on ${SLURM_NTASKS:-1} task(s) via $TRAIN_LAUNCHER," \
        "master $MASTER_ADDR:$MASTER_PORT"
    case "$TRAIN_LAUNCHER" in
        srun)
            srun "${srun_args[@]}" python -m megadoremi.train "$CONFIG" "${run_dir[@]}" "${extra[@]}" "$@" \
                --resume auto || status=$?
            ;;
        deepspeed)
            split_words ds_args "$DEEPSPEED_ARGS"
            hostfile=$(mktemp "${TMPDIR:-/tmp}/megadoremi-hostfile.XXXXXX")
            make_deepspeed_hostfile "$hostfile"
            log "deepspeed hostfile: $(tr '\n' ' ' <"$hostfile")"
            # pdsh's ssh sessions start with a bare environment; DeepSpeed exports PYTHON* and what DS_ENV_FILE
            # lists (read on this node): the threads and PATH of this job (its virtualenv first), then the user's
            # own file (~/.deepspeed_env, or what their DS_ENV_FILE names), which DS_ENV_FILE would hide.
            envfile=$(mktemp "${TMPDIR:-/tmp}/megadoremi-dsenv.XXXXXX")
            printf 'OMP_NUM_THREADS=%s\nPATH=%s\n' "$OMP_NUM_THREADS" "$PATH" >"$envfile"
            for user_env in "${DS_ENV_FILE:-$HOME/.deepspeed_env}" ./.deepspeed_env; do
                if [[ -f "$user_env" ]]; then
                    grep -v '^[[:space:]]*$' "$user_env" >>"$envfile" || true
                fi
            done
            DS_ENV_FILE=$envfile deepspeed --hostfile "$hostfile" --master_addr "$MASTER_ADDR" \
                --master_port "$MASTER_PORT" "${ds_args[@]}" --module megadoremi.train "$CONFIG" "${run_dir[@]}" \
                "${extra[@]}" "$@" --resume auto || status=$?
            rm -f "$hostfile" "$envfile"
            ;;
        *) die "TRAIN_LAUNCHER=$TRAIN_LAUNCHER: expected srun or deepspeed" ;;
    esac
    if [[ $status -eq $EXIT_REQUEUE ]]; then
        requeue_job "training checkpointed after a signal; the next run resumes from the checkpoint"
    elif [[ $status -eq $EXIT_KILLED_BY_USR1 ]]; then
        requeue_job "training killed by SIGUSR1 before it could checkpoint; the next run resumes from the last one"
    fi
    if [[ $status -ne 0 ]]; then
        log "training failed with exit status $status"
        return "$status"
    fi
    log "training finished"
}

# run_python_step SRUN_ARGS SCRIPT [ARG ...]: one srun step running a repository tool on every task
# (SRUN_ARGS is one string of srun options, e.g. "--mpi=pmi2").
run_python_step() {
    local -a srun_args
    split_words srun_args "$1"
    shift
    srun "${srun_args[@]}" python "$@"
}

# make_deepspeed_hostfile PATH [SLOTS]: a DeepSpeed hostfile ("host slots=N" per node of the job), for launching
# with `deepspeed --hostfile` instead of srun (run_training does it with TRAIN_LAUNCHER=deepspeed). SLOTS:
# processes per node (default: GPUs per node, else tasks per node), so a job has one task per node
# (#SBATCH --ntasks-per-node=1, --gpus-per-node=8).
#
# DeepSpeed starts every node's processes with pdsh over passwordless ssh (it checks ssh to the first host
# first; on a single node it starts the ranks locally). Requeue-on-signal is srun's feature only: the launcher runs
# inside the batch step, so `scancel --signal=USR1` (job steps) does not reach it, and --full would also kill
# DeepSpeed's launcher (SIGUSR1's default action). Rely on checkpoint.interval and resubmit (--resume auto picks up
# the newest checkpoint).
make_deepspeed_hostfile() {
    local path=$1
    local slots=${2:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
    slots=${slots%%(*}  # SLURM_NTASKS_PER_NODE can read "2(x3)" on heterogeneous layouts
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "make_deepspeed_hostfile: SLURM_JOB_NODELIST is not set (not in a job)"
    mkdir -p "$(dirname "$path")"
    scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v slots="$slots" '{ print $1 " slots=" slots }' >"$path"
}
