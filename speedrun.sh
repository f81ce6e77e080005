#!/usr/bin/env bash
# The speedrun (records/RULES.md): prepare what is missing (untimed), train the track's record configuration RUNS
# times, each stopping when its small periodic evaluation reaches the target, confirm each run on the full
# evaluation, write the record folder and check it with records/verify.py. The runs train on a snapshot of the
# working tree taken at the start (RUNS_DIR/NAME-code, gone at the end): editing the tree meanwhile changes none.
#
#   bash speedrun.sh                          # 8gpu track: torchrun on all visible GPUs (not yet measured)
#   bash speedrun.sh --track 1gpu             # one GPU, smaller model (not yet measured)
#   bash speedrun.sh --track cpu              # CPU track: runs two at a time, one thread each
#   bash speedrun.sh --calibrate              # the track's baseline at its fixed budget: the calibration record
#   bash speedrun.sh --smoke                  # the whole path on the CPU with a tiny model, in about a minute
#   bash speedrun.sh --track cpu -- --lr 3e-3 # after --: train.py flags, in place of the record configuration
#   BESIDE=1 bash speedrun.sh --track cpu -- --lr 3e-3   # each run beside the record configuration's of its seed
#
# Environment: RUNS (default the track's minimum, in whole pairs on the CPU), NAME and WHAT (the record folder's name
# and what changed), STOP (the periodic check's stopping value, default the target as that check reads it, the track's
# `stop`: a margin helps the full evaluation confirm it), EVERY (steps between the small evaluations; CPU track),
# RECORDS (default records/), RUNS_DIR (default runs/), BESIDE (1: also run the record configuration, seed by seed
# beside the flags after --, into the folder's beside/, at the commit its record's runs trained at: on a machine of
# another speed the leaderboard scales a record's time by them, records/RULES.md).
set -euo pipefail
((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] >= 501)) ||  # wait -n -p
  { echo "speedrun.sh: needs bash 5.1 or newer; this is $BASH_VERSION" >&2; exit 1; }
{  # bash reads a script while it runs it: in braces it reads it whole first, so an edit meanwhile changes nothing
cd "$(dirname "$0")"
die() {  # die CODE MESSAGE...: the message on stderr, after the script's name, and exit CODE
  echo "speedrun.sh: ${*:2}" >&2
  [ -z "${SMOKE_RECORDS:-}" ] || rmdir "$SMOKE_RECORDS" 2> /dev/null || true  # made below, still empty: refused
  exit "$1"
}
COMMAND="${RUNS:+RUNS=$RUNS }${STOP:+STOP=$STOP }${EVERY:+EVERY=$EVERY }${BESIDE:+BESIDE=$BESIDE }bash speedrun.sh $*"
TRACK=8gpu KIND=record WORLD=(-u RANK -u WORLD_SIZE) SMOKE_RECORDS=  # WORLD: torchrun's, for train.py's check
while [ $# -gt 0 ]; do
  case $1 in
    --track)
      case ${2:-} in
        8gpu|1gpu|cpu) TRACK=$2; shift 2 ;;
        *) die 2 "--track ${2:-(missing)}: one of 8gpu, 1gpu, cpu (--smoke: the smoke track)" ;;
      esac ;;
    --calibrate) KIND=calibration; shift ;;
    --smoke) TRACK=smoke; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit 0 ;;  # the usage above
    --) shift; break ;;
    *) die 2 "unknown option $1 (usage at the top of speedrun.sh)" ;;
  esac
done
[ "$KIND" = record ] || [ $# -eq 0 ] ||
  die 2 "--calibrate trains the track's baseline as it is: no train.py flags after --"
for flag in "$@"; do  # speedrun.sh's own: each run would take the copy after -- and break the rules it checks
  case ${flag%%=*} in
    --seed|--out|--resume)
      die 2 "$flag after --: speedrun.sh gives each run its seed and folder (RUNS, NAME, RUNS_DIR)" ;;
    --track) die 2 "$flag after --: give it before --, to speedrun.sh" ;;
    -h|--help) die 2 "$flag after --: python train.py --help lists train.py's flags" ;;
    --target|--eval-every|--eval-samples|--eval-minutes|--eval-ref|--max-time|--max-steps)
      die 2 "$flag after --: the track's rules set it (records/RULES.md); STOP and EVERY set the stopping rule" ;;
  esac
done
PROTOCOL=$(python records/verify.py --protocol "$TRACK")  # metric, target, stop, samples, steps, cfg, runs, lower
eval "$PROTOCOL"
if [ "$TRACK" = smoke ] && [ -z "${RECORDS:-}" ]; then SMOKE_RECORDS=$(mktemp -d) RECORDS=$SMOKE_RECORDS; fi
if [ "$TRACK" = smoke ]; then RUNS_DIR=${RUNS_DIR:-$RECORDS/runs}; fi
stop=${stop:-$target}  # the periodic check's value at the target (GPU tracks: their small FID's, calibrated)
RECORDS=${RECORDS:-records} RUNS_DIR=${RUNS_DIR:-runs} STOP=${STOP:-$stop}
NAME=${NAME:-$TRACK-$KIND-$(date +%H%M%S)}
[[ $NAME =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||  # a folder name under RECORDS and RUNS_DIR, not a path
  die 2 "NAME=$NAME: letters, digits, '.', '_' and '-' only (it names the record's folder)"
FOLDER=$RECORDS/$(date +%F)_$NAME
DATA=data/mj  # train.SPEEDRUN_DATA, prepared by train.SPEEDRUN_PREPARE
for var in RECORDS RUNS_DIR; do  # a folder, or one to make, to write in: found now, not after the runs (made then)
  above=${!var}
  while [ ! -e "$above" ] && [ ! -L "$above" ] && [ "$above" != "$(dirname "$above")" ]; do
    above=$(dirname "$above")
  done
  [ -d "$above" ] && [ -w "$above" ] ||
    die 1 "$var=${!var}: $above is not a folder you can write in; set $var to a folder, or one to make"
done
[ ! -e "$FOLDER" ] || die 1 "$FOLDER exists; choose another NAME"
mapfile -t LEFT < <(for left in "$NAME-[0-9]*" "$NAME-beside-[0-9]*" "$NAME-code" "$NAME-beside-code"; do
                      compgen -G "$RUNS_DIR/$left" || true  # none: on to the next (set -e holds in here)
                    done)
if [ ${#LEFT[@]} -gt 0 ]; then  # kept: a run folder train.py would refuse, a console that says why a run failed
  SHOWN=${LEFT[*]:0:3}; [ ${#LEFT[@]} -le 3 ] || SHOWN+=" and $((${#LEFT[@]} - 3)) more"
  die 1 "NAME=$NAME: an earlier attempt's files are there: $SHOWN (runs, which train.py would not overwrite;" \
        "*.out, their consoles, which say why a run failed; *-code, its code: git worktree remove --force <it>);" \
        "choose another NAME, or move what you need and remove them"
fi
# found, not imported (2 s): else each run fails at its first line, after the snapshot is taken
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" ||
  die 1 "$(command -v python || echo python) cannot import torch: activate the environment of README's Install"
git rev-parse --verify --quiet HEAD > /dev/null ||
  die 1 "runs in a git clone with a commit (each log names it; the runs train on a snapshot of it)"
if [ -n "${BESIDE:-}" ] && [ "$BESIDE" != 1 ]; then
  die 1 "BESIDE=$BESIDE: set BESIDE=1 to run the record configuration beside yours, or leave it unset"
fi
if [ -n "${EVERY:-}" ] && [[ $TRACK == *gpu ]]; then  # no runs beside to share another cadence: the rules fix it
  die 1 "EVERY is for the CPU track; a GPU track checks for its target every 2,500 steps (RULES.md)"
fi
if [ -n "${BESIDE:-}" ] && [[ $TRACK == *gpu ]]; then  # one run at a time: none could start with the candidate's
  die 1 "BESIDE is for the CPU track, whose machines differ; a GPU track's hardware is fixed"
fi
if [ "$KIND" = record ] && [ -z "$target" ]; then
  die 1 "the $TRACK track has no target yet: bash speedrun.sh --track $TRACK --calibrate first"
fi
if [ -n "$STOP" ] && ! [[ $STOP =~ ^[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then
  die 2 "STOP=$STOP: a number ($metric's value at which each run stops)"
fi
if [ -n "${EVERY:-}" ] && ! [[ $EVERY =~ ^0*[1-9][0-9]*$ ]]; then  # else each run would refuse it, after the start
  die 2 "EVERY=$EVERY: a whole number of steps above 0 (training steps between the small evaluations)"
fi
if [ "$KIND" = record ] && ! awk -v stop="$STOP" -v target="$stop" -v lower="$lower" \
    'BEGIN { exit !(stop + 0 == stop && (lower ? stop <= target : stop >= target)) }'; then
  die 1 "STOP=$STOP: runs stopping there would not meet the target on the mean ($metric" \
        "$([ "$lower" = 1 ] && echo "<=" || echo ">=") $target$([ "$stop" = "$target" ] ||
        echo ", which the periodic check reads as $stop")); use $stop or a margin beyond it"
fi
if [ "$KIND" = record ] && [ "$TRACK" = cpu ] && [ -z "${BESIDE:-}" ]; then
  echo "speedrun.sh: note: without BESIDE=1 these runs cannot verify as a CPU record (records/RULES.md): a record" \
       "runs the configuration it replaces beside it, BESIDE=1 bash speedrun.sh --track cpu -- <flags>"
fi
# the budget: a calibration trains the baseline for a fixed budget, a record stops at the target (with a cap)
case $TRACK-$KIND in
  *-calibration) read -r -a BUDGET <<< "$budget" ;;  # the track's (verify.py's TRACKS)
  smoke-record) BUDGET=(--max-steps 4 --target "$metric=$STOP") ;;
  cpu-record) BUDGET=(--max-time 60 --target "$metric=$STOP") ;;
  *) BUDGET=(--max-steps 100000 --target "$metric=$STOP") ;;
esac

PARALLEL=2; [[ $TRACK != *gpu ]] || PARALLEL=1  # CPU runs go in pairs, as calibrated; GPU runs one at a time
RUNS=${RUNS:-$(( (runs + PARALLEL - 1) / PARALLEL * PARALLEL ))}  # the minimum, in whole pairs
if ! [[ $RUNS =~ ^[0-9]+$ ]] || [ $((10#$RUNS)) -lt "$runs" ]; then
  die 1 "RUNS=$RUNS: the $TRACK track's rules need at least $runs runs"
fi
RUNS=$((10#$RUNS))  # decimal: bash's arithmetic reads 010 as octal 8, and 08 not at all
[ $((RUNS % PARALLEL)) -eq 0 ] ||
  die 1 "RUNS=$RUNS: $TRACK runs go $PARALLEL side by side, as calibrated; set RUNS to a multiple of it"
git diff --quiet HEAD -- shapes_teacher.safetensors ||  # verify.py checks the teacher against the commit
  die 1 "shapes_teacher.safetensors differs from HEAD's: commit the teacher first (records/RULES.md)"
GONE=$(git diff --name-only --no-renames --diff-filter=D HEAD -- ':(glob)*.py' | tr '\n' ' ')
[ -z "$GONE" ] ||  # verify.py wants in each log every .py file of the commit's root: found now, not after the runs
  die 1 "${GONE% } of HEAD deleted or renamed in the working tree: commit that first (records/RULES.md)"

case $TRACK in
  8gpu|1gpu)
    NPROC=$(python -c "import torch; print(torch.cuda.device_count())")
    [ "$NPROC" -gt 0 ] || die 1 "no GPU visible; the CPU track is --track cpu"
    [ "$TRACK" = 8gpu ] || NPROC=1
    [ "$NPROC" = "$world" ] || die 1 "the $TRACK track runs on $world GPUs (records/RULES.md); $NPROC visible"
    GPUS=$(python -c "import torch; print(*sorted({torch.cuda.get_device_name(i) for i in range($NPROC)}), sep=', ')")
    [ "$GPUS" = "$gpu" ] ||  # found now, not by verify.py after hours of runs
      die 1 "the $TRACK track runs on $gpu (records/RULES.md); this machine has $GPUS, whose runs would not verify"
    LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC")
    TRAIN=(--track "$TRACK" --compile --eval-every 2500 --eval-samples 2048 --eval-ref "$DATA/ref-2k.npz"
           --ckpt-every 1000000000 --keep 1)  # the last checkpoint only (tens of GB): a record's run is never resumed
    CONFIRM=(--ref "$DATA/ref.npz" --metrics fid) WORLD=(WORLD_SIZE="$NPROC" RANK=0) ;;
  cpu)
    LAUNCH=(env OMP_NUM_THREADS=1 python) CONFIRM=()
    TRAIN=(--track cpu --eval-every "${EVERY:-250}" --eval-samples 256) ;;
  smoke)
    LAUNCH=(env OMP_NUM_THREADS=1 python) CONFIRM=()
    TRAIN=(--track cpu --hidden 64 --depth 3 --batch-size 8 --micro-batch 8 --log-every 1 --eval-every "${EVERY:-2}"
           --eval-samples 4 --sample-steps "$steps") ;;
  *) die 2 "unknown track $TRACK" ;;
esac

# The record configuration: what a record adds to the track's baseline (README, "The speedrun": why these); flags
# after -- replace it, a calibration trains the baseline as it is.
case $TRACK in
  8gpu|1gpu) RECORD=(--repa dinov3 --optimizer muon) ;;  # PRX part 2's two largest gains at the same VAE (REFERENCE 5)
  # cpu: the current record's (bf16 pays on a CPU with AMX: records/RULES.md)
  cpu) RECORD=(--repa builtin --tread --optimizer muon --repa-lambda 3 --compile --muon-ns-steps 3 --batch-size 20
               --micro-batch 20 --route-ratio 0.25 --precision bf16 --muon-lr 6e-3 --self-guidance 3
               --ema 0.95 --ema-every 1 --caption-dropout 0.05) RECORD_DIR=records/2026-12-06_dropout05 ;;
  smoke) RECORD=(--repa builtin --tread --optimizer muon --repa-lambda 2) ;;  # cpu's techniques, no --compile: a minute
esac
CURRENT=("${RECORD[@]}")  # what BESIDE runs
if [ -n "${BESIDE:-}" ] && { [ $# -eq 0 ] || [ "$KIND" = calibration ]; }; then
  die 1 "BESIDE=1 runs the record configuration beside a candidate's: give the candidate's train.py flags after --" \
        "(a record attempt, not --calibrate)"
fi
if [ $# -gt 0 ]; then RECORD=("$@"); elif [ "$KIND" = calibration ]; then RECORD=(); fi
WHAT=${WHAT:-"${RECORD[*]:-the $TRACK baseline}"}
# the runs' flags as train.py checks them (not the files they name, some not prepared yet): a refused flag is named
# now, not by the runs after the data's preparation (hours on a GPU track)
if ! refused=$(env "${WORLD[@]}" python -c 'import sys; sys.argv[0] = "train.py"; import train
train.get_args(sys.argv[1:], files=False)' "${TRAIN[@]}" "${BUDGET[@]}" --seed 0 --out "$RUNS_DIR/$NAME-0" \
    ${RECORD[@]+"${RECORD[@]}"} 2>&1 > /dev/null); then
  refused=$(grep -m 1 '^train.py: error: ' <<< "$refused" || tail -n 1 <<< "$refused")
  die 2 "${refused:-train.py's check of the runs' flags ended with no message} (nothing started)"
fi
echo "speedrun.sh: $TRACK $KIND, configuration: ${RECORD[*]:-the baseline} (flags after -- replace it)"
if [[ $TRACK == *gpu ]]; then  # once, untimed
  [ -f "$DATA/index.json" ] || "${LAUNCH[@]}" prepare.py --out "$DATA"  # Flux VAE + T5Gemma
  [ -f "$DATA/ref.npz" ] || "${LAUNCH[@]}" eval.py ref --data "$DATA" --num-samples "$samples" --metrics fid \
    --out "$DATA/ref.npz"  # the full evaluation's reference (of the held-out images the rules pin)
  [ -f "$DATA/ref-2k.npz" ] || "${LAUNCH[@]}" eval.py ref --data "$DATA" --num-samples 2048 --metrics fid \
    --out "$DATA/ref-2k.npz"  # the periodic small evaluations' reference
fi

# one run: name, seed, the folder whose train.py and eval.py run, train.py flags: train, then the full evaluation
# appended to the log (the record's metric)
run_one() {
  local seed=$2 run=$RUNS_DIR/$1-$2 code=$3
  shift 3
  (cd "$code" && "${LAUNCH[@]}" train.py "${TRAIN[@]}" "${BUDGET[@]}" --seed "$seed" --out "$run" "$@")
  (cd "$code" && "${LAUNCH[@]}" eval.py --ckpt "$run" --num-samples "$samples" --steps "$steps" --cfg-scale "$cfg" \
    --seed 42 "${CONFIRM[@]}" --out "$run/confirm.json")
  { echo "=== confirm.json"; cat "$run/confirm.json"; echo; } >> "$run/log.txt"
  echo -e "=== attempt.json\n{\"runs\": $RUNS}" >> "$run/log.txt"  # how many runs the attempt made (verify.py)
}

mkdir -p "$RUNS_DIR"
RUNS_DIR=$(cd "$RUNS_DIR" && pwd)  # the runs' --out, from any code folder
declare -A running=()  # pid: run. On any exit the runs still going stop: on the CPU they would slow the next attempt
WORKTREES=()  # and the code folders go
trap 'for pid in "${!running[@]}"; do kill -- -"$pid" 2>/dev/null || true; done
      for tree in ${WORKTREES[@]+"${WORKTREES[@]}"}; do git worktree remove --force "$tree" || true; done' EXIT
# The candidate trains on a snapshot of the working tree: a worktree of HEAD with the tree's new and changed top-level
# .py files copied in, so that editing the tree while the runs train changes none of them (one source per record,
# verify.py). Those are what each log holds: any other change (a package folder, a data file) would reach the runs
# unlogged, so the runs have HEAD's version of it, which the log's commit shows.
CODE=$RUNS_DIR/$NAME-code
# Staged or not, new (not what git ignores: runs/, data/); a rename as a deletion and a new file
mapfile -d '' CHANGED < <(git diff -z --name-only --no-renames HEAD; git ls-files -z --others --exclude-standard)
git worktree prune  # the folders of killed attempts
git worktree add --quiet --detach "$CODE" HEAD
WORKTREES+=("$CODE")
LEFT_OUT=()
for file in ${CHANGED[@]+"${CHANGED[@]}"}; do
  if [[ $file == */* || $file != *.py ]]; then LEFT_OUT+=("$file")
  elif [ -f "$file" ]; then cp -p "$file" "$CODE/$file"; fi  # (a deleted one is refused above)
done
[ ${#LEFT_OUT[@]} -eq 0 ] || echo "speedrun.sh: the runs train on HEAD's version of what is not a top-level .py file" \
  "(the logs hold those only; commit the rest): left out ${LEFT_OUT[*]:0:5}$([ ${#LEFT_OUT[@]} -le 5 ] || echo ...)"
[ ! -e data ] || ln -s "$PWD/data" "$CODE/data"  # the prepared data (data/mj), ignored by git
BESIDE_CODE=$CODE  # the beside runs: the code of the commit their record's runs trained at, in a worktree
if [ -n "${BESIDE:-}" ] && [ -n "${RECORD_DIR:-}" ]; then
  BESIDE_COMMIT=$(python records/verify.py --commit "$RECORD_DIR")
  git cat-file -e "$BESIDE_COMMIT^{commit}" 2>/dev/null ||
    die 1 "the runs beside train at $RECORD_DIR's commit $BESIDE_COMMIT, which this clone lacks (a shallow clone?):" \
          "git fetch --unshallow"
  BESIDE_CODE=$RUNS_DIR/$NAME-beside-code
  git worktree add --quiet --detach "$BESIDE_CODE" "$BESIDE_COMMIT"
  WORKTREES+=("$BESIDE_CODE")
  for file in "$RECORD_DIR"/*.py; do  # sources its runs ran that differ from that commit (verify.py carried them),
    # which its logs hold; not another script kept in the folder, which would make the runs beside another code
    if [ -e "$file" ] && grep -qxF "=== $(basename "$file")" "$RECORD_DIR/log_0.txt"; then
      cp -p "$file" "$BESIDE_CODE/"
    fi
  done
  same_code() {  # the top-level .py files of two folders: the same names, the same bytes
    [ "$(cd "$1" && ls -- *.py)" = "$(cd "$2" && ls -- *.py)" ] || return 1
    for file in "$1"/*.py; do cmp -s "$file" "$2/${file##*/}" || return 1; done
  }
  if [ "${RECORD[*]}" = "${CURRENT[*]}" ] && same_code "$CODE" "$BESIDE_CODE"; then
    die 1 "BESIDE=1 with the record's own flags and its code (its commit $BESIDE_COMMIT, with the sources its folder" \
          "carries) runs one configuration twice: change the flags after -- or the code"
  fi
  echo "speedrun.sh: the runs beside train at $RECORD_DIR's commit, in $BESIDE_CODE"
fi
for ((seed = 0; seed < RUNS; seed++)); do  # PARALLEL runs at a time; a failed run stops the speedrun
  for name in "$NAME" ${BESIDE:+"$NAME-beside"}; do  # BESIDE: the record configuration's run of the seed, side by side
    if [ "$name" = "$NAME" ]; then code=$CODE flags=(${RECORD[@]+"${RECORD[@]}"})
    else code=$BESIDE_CODE flags=("${CURRENT[@]}"); fi
    set -m  # the run in a process group of its own, so that the trap ends its train.py or eval.py with it
    run_one "$name" "$seed" "$code" ${flags[@]+"${flags[@]}"} > "$RUNS_DIR/$name-$seed.out" 2>&1 &
    set +m
    running[$!]=$name-$seed
    echo "run $name-$seed: $RUNS_DIR/$name-$seed (console: $RUNS_DIR/$name-$seed.out)"
    if [ ${#running[@]} -eq "$PARALLEL" ]; then  # the number of runs is a multiple of PARALLEL
      while [ ${#running[@]} -gt 0 ]; do  # in the order they end (bash 5.1's wait -n -p): a failure stops all
        if ! wait -n -p pid "${!running[@]}"; then  # the first failure; the trap stops the others
          console=$RUNS_DIR/${running[$pid]}.out
          # why: the first error (a refused flag, a traceback's exception), not torchrun's report of it, which
          # follows (its ChildFailedError, "error_file", "traceback : To enable traceback see .../errors.html")
          prefix='(\[rank[0-9]+\]: )?'  # torchrun's prefix of a worker's traceback lines
          why=$(grep -E "^$prefix([a-z_]+\.py: )?error: |^$prefix[A-Za-z_.]*(Error|Exception): " "$console" |
                grep -v ChildFailedError | head -n 1 || true)
          [ -n "$why" ] || why=$(tail -n 1 "$console")
          die 1 "run ${running[$pid]} failed${why:+: $why} (console: $console); the other runs are stopped"
        fi
        unset "running[$pid]"
      done
    fi
  done
done

copy_runs() {  # name, folder: each run's log, and its last sample grid to look at
  mkdir -p "$2"
  for ((seed = 0; seed < RUNS; seed++)); do
    cp "$RUNS_DIR/$1-$seed/log.txt" "$2/log_$seed.txt"
    last=$(ls -v "$RUNS_DIR/$1-$seed"/samples_*.png 2>/dev/null | tail -1 || true)  # none: no evaluation ran
    [ -z "$last" ] || cp "$last" "$2/samples_$seed.png"
  done
}
copy_runs "$NAME" "$FOLDER"
[ -z "${BESIDE:-}" ] || copy_runs "$NAME-beside" "$FOLDER/beside"
python records/verify.py --write --track "$TRACK" --kind "$KIND" --what="$WHAT" --command="$COMMAND" "$FOLDER"
[ "$TRACK" != smoke ] ||
  echo "speedrun.sh: the smoke record is in $RECORDS, its runs in $RUNS_DIR (remove them when done)"
exit
}
