# shellcheck shell=bash
# Sourced by train.sbatch: the one line that ends a job log and says what happened.
#
#   job_status_line RC PREEMPTED TERMINATED CKPT_DIR LOG_DIR
#
# RC          exit code of the training step (srun -> megarank launch -> torchrun agent)
# PREEMPTED   1 when the batch shell got USR1 (the time-limit warning) and the step was asked to save and exit
# TERMINATED  1 when the batch shell got SIGTERM (scancel, preemption, the time limit itself)
# CKPT_DIR    checkpoint.dir (empty: none); its `latest` file names the newest complete step
# LOG_DIR     every rank's stdout/stderr (megarank launch --log-dir); a failure's reason is read from there
#
# Exit codes the line explains: 0 = the trainer ended normally (finished, or saved and exited on request);
# 128 + N = the launcher was stopped by signal N (143 = SIGTERM: the workers saved the step they were in before
# exiting when checkpoint.dir is set -- megarank launch prints `stopped by SIGTERM`, no traceback); anything
# else = failed, with the last error line any rank printed.

# The step named by CKPT_DIR/latest ("step-120" -> 120), or nothing.
latest_step() {
    local marker=$1/latest
    [[ -n $1 && -f $marker ]] || return 0
    local name
    name=$(tr -d '[:space:]' <"$marker")
    [[ $name =~ ^step-0*([0-9]+)$ ]] && echo "${BASH_REMATCH[1]}"
}

# The last error line any rank wrote under LOG_DIR (megarank's one-line errors first, else a Python exception).
last_error_line() {
    [[ -n $1 && -d $1 ]] || return 0
    local files
    mapfile -t files < <(find "$1" -type f -name '*.log' \
                          -printf '%T@ %p\n' 2>/dev/null | sort -n | cut -d' ' -f2-)
    ((${#files[@]})) || return 0
    local line
    line=$(grep -h -E 'megarank[-a-z]* [a-z-]+: error: |megarank[-a-z]*: error: ' "${files[@]}" 2>/dev/null | tail -n 1)
    [[ -n $line ]] || line=$(grep -h -E '^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception): ' "${files[@]}" 2>/dev/null | tail -n 1)
    # torchrun's per-rank prefix ("[default0]:"), if any, is not part of the message
    sed -E 's/^\[[^]]*\]:?//' <<<"$line" | cut -c1-400
}

job_status_line() {
    local rc=$1 preempted=$2 terminated=$3 ckpt=$4 logs=$5
    local step saved
    step=$(latest_step "$ckpt")
    if [[ -n $step ]]; then saved="latest checkpoint: step $step ($ckpt/step-$step)"
    elif [[ -n $ckpt ]]; then saved="no checkpoint saved in $ckpt"
    else saved="no checkpoint.dir: nothing saved"; fi
    local job="megarank job ${SLURM_JOB_ID:-?}"
    if [[ $rc == 0 && $preempted == 1 ]]; then
        echo "=== $job: PREEMPTED at the time-limit warning (USR1); saved and requeued; the next run resumes ($saved)"
    elif [[ $rc == 0 && $terminated == 1 ]]; then
        echo "=== $job: STOPPED by SIGTERM (scancel, preemption or time limit); not requeued: submit the same command to resume ($saved)"
    elif [[ $rc == 0 ]]; then
        echo "=== $job: FINISHED ($saved)"
    elif ((rc > 128 && rc < 160)); then
        local sig
        sig=$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128)))
        echo "=== $job: STOPPED by SIG$sig (exit $rc; scancel, preemption or time limit); not requeued: submit the same command to resume ($saved)"
    else
        local why
        why=$(last_error_line "$logs")
        echo "=== $job: FAILED with exit code $rc: ${why:-no error line in ${logs:-the rank logs}; see above} ($saved)"
    fi
}
