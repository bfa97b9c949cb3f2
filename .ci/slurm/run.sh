#!/usr/bin/env bash
# CI stage: submit the jobs/ scripts to a real Slurm cluster. Starts a private one-node cluster
# (.ci/slurm/cluster.sh), runs tests/slurm with HFLMPI_SLURM=1, and always stops the cluster.
# Exit code: pytest's (5, nothing collected or everything skipped, is a failure); 0 with
# "slurm stage skipped: <reason>" when no cluster can be had here (not root, no apt-get, the
# install failed; HFLMPI_SLURM_REQUIRED=1 makes that a failure too).
set -uo pipefail
cd "$(dirname "$0")/../.."

VENV=${HFLMPI_VENV:-.venv}
LOGS=${HFLMPI_TEST_LOGS:-.ci/logs}/slurm
STAGE_TIMEOUT=${HFLMPI_SLURM_STAGE_TIMEOUT:-1200}
export HFLMPI_SLURM_DIR=${HFLMPI_SLURM_DIR:-/tmp/hflmpi-slurm}
CLUSTER=.ci/slurm/cluster.sh
start=$SECONDS

echo "== Slurm jobs on a private one-node Slurm cluster ($HFLMPI_SLURM_DIR)"
# One cluster per machine at a time (fixed ports and state dir): wait for another run to finish.
if [[ $(id -u) -eq 0 ]] && command -v flock >/dev/null; then
    exec 9>"$HFLMPI_SLURM_DIR.lock"
    flock -w 900 9 || { echo "slurm stage: $HFLMPI_SLURM_DIR.lock still held after 900 s"; exit 1; }
fi

save_logs() {
    mkdir -p "$LOGS"
    local f
    for f in "$HFLMPI_SLURM_DIR"/log/*.log; do
        [[ -f $f ]] && cp "$f" "$LOGS/" && { echo "--- $f (last 30 lines; copy in $LOGS)"; tail -n 30 "$f"; }
    done
}
cleanup() {
    bash "$CLUSTER" stop
}
trap cleanup EXIT
trap 'exit 130' INT TERM

out=$(bash "$CLUSTER" start)
code=$?
[[ -n $out ]] && echo "$out"
if [[ $code -eq 0 ]] && grep -q '^SKIPPED:' <<<"$out"; then
    echo "slurm stage skipped: $(sed -n 's/^SKIPPED: //p' <<<"$out" | head -n 1)"
    exit 0
fi
if [[ $code -ne 0 ]]; then
    echo "slurm stage failed: the cluster did not start (exit $code)"
    exit 1
fi

mkdir -p "$LOGS"
# The marker lets `cluster.sh stop` find (by PID) job processes left behind by a failed test.
HFLMPI_SLURM=1 SLURM_CONF="$HFLMPI_SLURM_DIR/etc/slurm.conf" HFLMPI_SLURM_CLUSTER="$HFLMPI_SLURM_DIR" \
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 \
    timeout --signal=KILL "$STAGE_TIMEOUT" "$VENV/bin/python" -m pytest -q -rfEs -p no:cacheprovider \
    --timeout=300 --durations=0 --junitxml="$LOGS/junit.xml" tests/slurm
code=$?
if [[ $code -eq 5 ]]; then
    echo "slurm stage collected no tests (or skipped them all); failing"
    code=1
fi
if [[ $code -ne 0 ]]; then
    echo "slurm stage failed (exit $code); daemon logs:"
    save_logs
fi
echo "slurm stage: exit $code after $((SECONDS - start)) s"
exit "$code"
