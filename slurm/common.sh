# Sourced by slurm/one_node.sbatch and slurm/multi_node.sbatch (not run by itself): what
# the two wrappers share. They call
#
#   fixres_args "$@"                 # -> $script, $root (its folder), $args (with --name / --resume auto)
#   fixres_check_config FILE         # exit 2 with one line if the Accelerate config is missing or bad
#   fixres_run SRUN_OPTIONS... -- COMMAND...   # COMMAND under srun; early warning -> checkpoint -> requeue
#
# Requeue protocol: SLURM sends USR1 to the batch shell (#SBATCH --signal=B:USR1@N); the shell
# passes it to every process of the job's steps on every node (scancel --signal=USR1). The
# launchers ignore USR1 (they would die of it), the training processes handle it: a checkpoint
# at the next step boundary, every rank at the same step, then exit (train.py and finetune.py:
# status 75; through `accelerate launch` or torchrun: 1). When the step has ended, and not with
# success, the shell requeues the job; SLURM runs this script again with SLURM_RESTART_COUNT=1,
# 2, ... and fixres_args adds `--resume auto`. A TERM (scancel, a preemption, `scontrol
# requeue`) reaches the training processes from SLURM itself; the shell waits for their
# checkpoint and leaves any requeue to SLURM.

fixres_args() {
    if (($# == 0)); then
        echo "usage: sbatch $0 train.py|finetune.py|sweep.py [their options]" >&2
        exit 2
    fi
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        echo "error: $0 is a SLURM batch script: submit it with sbatch" >&2
        exit 2
    fi
    script=$1
    shift
    args=("$@")
    root=$(dirname "$script")
    if [[ ! -f $script ]]; then
        echo "error: $script: no such script (run sbatch from the fixres folder, or give its path)" >&2
        exit 2
    fi
    local stem a given_name=0 given_resume=0
    stem=$(basename "$script" .py)
    for a in "${args[@]}"; do
        [[ $a == --name || $a == --name=* ]] && given_name=1
        [[ $a == --resume || $a == --resume=* ]] && given_resume=1
    done
    # train.py and finetune.py: the run gets a name of its own, so that a requeued job resumes
    # its own run and not the newest of another job writing to the same --output. An explicit
    # --resume stays as given: it already names what to continue.
    if [[ $stem == train || $stem == finetune ]] && ((!given_resume)); then
        ((given_name)) || args+=(--name "$stem-$SLURM_JOB_ID")
        ((${SLURM_RESTART_COUNT:-0} > 0)) && args+=(--resume auto)
    fi
    return 0
}

fixres_check_config() {  # a one-line error here, not a traceback on every node later
    local py
    py=$(command -v python3 || command -v python)
    if [[ ! -f $1 ]]; then
        echo "error: accelerate config $1: no such file" >&2
        exit 2
    fi
    "$py" - "$1" <<'EOF' || exit 2
import gc
import sys
gc.disable()  # a check that ends after its imports (accelerate, torch): nothing for the collector to do
try:
    from accelerate.commands.config.config_args import load_config_from_file
except ImportError:  # not the launcher's Python: leave the check to `accelerate launch` itself
    sys.exit(0)
try:
    load_config_from_file(sys.argv[1])
except Exception as err:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    sys.exit(f"error: accelerate config {sys.argv[1]}: does not load: {reason}")
EOF
}

_fixres_usr1() {
    _fixres_warned=1
    _fixres_interrupted=1
    echo "fixres: USR1 (time limit near): asking the training processes for a checkpoint and a stop"
    scancel --signal=USR1 "$SLURM_JOB_ID" || kill -USR1 "$_fixres_child"
}

_fixres_term() {
    _fixres_interrupted=1
    echo "fixres: TERM: the training processes save a checkpoint and exit"
}

fixres_run() {
    local srun_opts=()
    while (($#)) && [[ $1 != -- ]]; do srun_opts+=("$1"); shift; done
    shift
    # srun (22.05+) does not inherit sbatch's --cpus-per-task: pass it on, or the launcher and
    # its data loader workers get one CPU on clusters that bind tasks to cores
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    echo "fixres: job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)), nodes $SLURM_JOB_NODELIST: $*"
    _fixres_warned=0
    trap _fixres_usr1 USR1
    trap _fixres_term TERM
    srun --kill-on-bad-exit=1 "${srun_opts[@]}" "$@" &
    _fixres_child=$!
    local rc
    while :; do   # `wait` returns early when a trapped signal comes in: wait again
        _fixres_interrupted=0
        wait "$_fixres_child"
        rc=$?
        ((_fixres_interrupted && rc > 128)) || break
    done
    if ((_fixres_warned && rc != 0)); then
        echo "fixres: the training stopped after the early warning (exit $rc): requeueing job" \
             "$SLURM_JOB_ID; its next start resumes from the checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$rc"
}
