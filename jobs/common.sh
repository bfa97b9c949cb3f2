# Shared by the jobs/*.sbatch scripts (sourced after `cd "$SLURM_SUBMIT_DIR"`; see jobs/README.md).
# Needs bash >= 4.4. Sets, in this order:
#   HFLMPI_SETUP   sourced first when set: a file with the site's `module load ...` lines
#   PYTHON         ${HFLMPI_PYTHON:-.venv/bin/python}
#   SRUN           (srun --mpi=${HFLMPI_SRUN_MPI:-pmi2} [--cpus-per-task=$SLURM_CPUS_PER_TASK])
#   ARGS           the words of HFLMPI_ARGS (hflmpi_words), appended to the hflmpi command line
# and defines hflmpi_words, which splits a variable like a shell command line (quotes group words,
# a backslash escapes the next character; nothing is expanded or run: no $VAR, globs or `...`).

hflmpi_die() {
    echo "hflmpi job: error: $*" >&2
    exit 2
}

# HFLMPI_SETUP: a file sourced by this shell before anything runs (module load, conda activate).
# `set -u` is lifted while it runs: module and conda scripts read unset variables.
if [[ -n ${HFLMPI_SETUP:-} ]]; then
    [[ -f $HFLMPI_SETUP && -r $HFLMPI_SETUP ]] ||
        hflmpi_die "HFLMPI_SETUP=$HFLMPI_SETUP is not a readable file (write the \`module load ...\` lines into a file and name it)"
    set +u
    # shellcheck disable=SC1090
    source "$HFLMPI_SETUP" || hflmpi_die "HFLMPI_SETUP=$HFLMPI_SETUP failed (exit $?)"
    set -u
fi

PYTHON=${HFLMPI_PYTHON:-.venv/bin/python}

# hflmpi_words NAME: split the variable NAME into the array WORDS with Python's shlex.split
# (POSIX shell rules: '...' and "..." group and are removed, \ escapes; no expansion). Only runs
# $PYTHON when the variable holds something. A last "ok" word tells a complete split from a
# failed one (the exit status of a process substitution is not seen here).
hflmpi_words() {
    local name=$1 text=${!1:-}
    WORDS=()
    [[ -n ${text//[[:space:]]/} ]] || return 0
    mapfile -d '' -t WORDS < <("$PYTHON" -c '
import shlex, sys
name, text = sys.argv[1:]
try:
    words = shlex.split(text)
except ValueError as exc:
    sys.exit(f"hflmpi job: error: {name}={text!r} is not a shell-style word list ({exc}); "
             "quote words holding spaces, e.g. --set \x27run.out=\"runs/a b.h5\"\x27")
sys.stdout.write("".join(word + "\0" for word in words) + "ok\0")
' "$name" "$text")
    if [[ ${#WORDS[@]} -eq 0 || ${WORDS[-1]} != ok ]]; then
        hflmpi_die "could not split $name with $PYTHON (see above)"
    fi
    unset 'WORDS[-1]'
}

hflmpi_words HFLMPI_ARGS
ARGS=("${WORDS[@]}")

# The PMI plugin must match the MPI library: pmi2 for PyPI's MPICH wheel (the README's install),
# pmix for Open MPI or another PMIx build. With the wrong one every task is a 1-rank world, and
# `hflmpi run` stops with exit 2 saying so. Slurm >= 22.05 srun no longer reads
# SLURM_CPUS_PER_TASK: pass it on, or each task gets one CPU. It is given on the command line
# rather than exported as SRUN_CPUS_PER_TASK, which would also reach the srun that mpirun uses
# to start its per-node daemons and confine all of a node's ranks to that many CPUs.
SRUN=(srun "--mpi=${HFLMPI_SRUN_MPI:-pmi2}")
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    SRUN+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
fi
