#!/usr/bin/env bash
# Strong and weak scaling of short hflmpi jobs at P = 1, 2, 4, 8 ranks (one mpiexec at a time),
# then plots with the alpha-beta cost model's predictions for 64..4096 ranks.
#   bash benchmarks/scaling.sh [OUT.h5] [PLOT_DIR]      (extra options: HFLMPI_SCALING_ARGS)
# See docs/scaling.md. On a 2-core machine, runs beyond 2 ranks are oversubscribed (CPU-bound).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HFLMPI_VENV:-.venv}
OUT=${1:-runs/scaling.h5}
PLOTS=${2:-runs/scaling_plots}
RANKS=${HFLMPI_SCALING_RANKS:-"1 2 4 8"}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
for n in $RANKS; do
    echo "== mpiexec -n $n hflmpi bench scaling"
    # shellcheck disable=SC2086
    "$VENV/bin/mpiexec" -n "$n" "$VENV/bin/python" -m mpi4py -m hflmpi bench scaling \
        --out "$OUT" ${HFLMPI_SCALING_ARGS:-}
done
"$VENV/bin/python" -m hflmpi bench scaling plot --out "$OUT" --plots "$PLOTS" --table "$PLOTS/tables.md"
