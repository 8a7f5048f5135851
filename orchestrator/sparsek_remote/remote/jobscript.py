"""The job-control script that runs on the host (POSIX sh, uploaded on first use).

It holds no values: paths, the run id and the runner's words arrive as arguments.
Its name carries a digest of its text, so a changed script never replaces one that
a running job is executing.

Layout it keeps under ``<remote_dir>``::

    lock/                 one per host: run_id, pid (made with an atomic mkdir)
    runs/<run_id>/        job.json, pid, runner.pid, heartbeat (touched every few
                          seconds), exit_code (reserved at start, filled in at the
                          end), events.jsonl (the runner's stdout), runner.stderr,
                          cancel.sh (optional), bundle/
"""

from __future__ import annotations

import hashlib

LOCKED_EXIT = 75
HEARTBEAT_S = 2

SCRIPT = r"""# sparsek-remote job control; POSIX sh; every value arrives as an argument.
set -u
cmd=${1:-}
[ $# -gt 0 ] && shift

lock_info() {
  rid=$(cat "$1/run_id" 2>/dev/null || true)
  pid=$(cat "$1/pid" 2>/dev/null || true)
  state=dead
  if [ ! -d "$1" ]; then
    state=free
  elif [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    state=alive
  elif [ -z "$pid" ]; then
    made=$(stat -c %Y "$1" 2>/dev/null || echo 0)
    [ $(( $(date +%s) - made )) -lt 120 ] && state=starting
  fi
  printf 'lock run_id=%s pid=%s state=%s\n' "${rid:--}" "${pid:--}" "$state"
}

release_lock() {
  if [ "$(cat "$1/lock/run_id" 2>/dev/null)" = "$2" ]; then rm -rf "$1/lock"; fi
}

case $cmd in
start)
  remote_dir=$1 run_dir=$2 run_id=$3 limit_s=$4
  shift 4
  if ! mkdir "$remote_dir/lock" 2>/dev/null; then
    lock_info "$remote_dir/lock"
    exit 75
  fi
  if ! printf '%s\n' "$run_id" > "$remote_dir/lock/run_id" \
     || ! printf '%-20s\n' - > "$run_dir/exit_code" || ! touch "$run_dir/heartbeat"; then
    rm -rf "$remote_dir/lock"
    exit 1
  fi
  setsid nohup sh "$0" wrap "$remote_dir" "$run_dir" "$run_id" "$limit_s" "$@" \
    </dev/null >/dev/null 2>&1 &
  printf '%s\n' "$!" > "$remote_dir/lock/pid"
  printf '%s\n' "$!" > "$run_dir/pid"
  printf 'started pid=%s\n' "$!"
  ;;
wrap)
  remote_dir=$1 run_dir=$2 run_id=$3 limit_s=$4
  shift 4
  cd "$run_dir" || exit 1
  printf '%s\n' "$$" > pid
  touch heartbeat
  ( while kill -0 $$ 2>/dev/null; do touch heartbeat 2>/dev/null; sleep 2; done ) &
  beat=$!
  child=
  trap 'kill -TERM "$child" 2>/dev/null; [ -f cancel.sh ] && sh cancel.sh >/dev/null 2>&1' TERM INT
  if command -v timeout >/dev/null 2>&1; then
    timeout -k 20 "$limit_s" "$@" >events.jsonl 2>runner.stderr </dev/null &
  else
    "$@" >events.jsonl 2>runner.stderr </dev/null &
  fi
  child=$!
  printf '%s\n' "$child" > runner.pid
  wait "$child"
  rc=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
  kill "$beat" 2>/dev/null
  # In place, into the bytes reserved at start: this works on a full disk too.
  printf '%-20s\n' "$rc" 1<>exit_code
  release_lock "$remote_dir" "$run_id"
  ;;
poll)
  run_dir=$1 ev_off=$2 log_off=$3 most=$4 ticks=${5:-0}
  if ! cd "$run_dir" 2>/dev/null; then
    printf 'state=missing\n'
    exit 0
  fi
  # Long poll: while the job runs and has written nothing new, wait up to ticks x 0.05 s,
  # so the client hears of new output or the end at once without asking many times.
  # The end is read from exit_code, not the process: an orphan nobody reaps stays a
  # zombie, and kill -0 still finds it.
  pid=$(cat pid 2>/dev/null || true)
  while [ "$ticks" -gt 0 ] && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do
    ec=-
    read -r ec < exit_code 2>/dev/null || true
    [ "$ec" = - ] || break
    ev=$(stat -c %s events.jsonl 2>/dev/null || echo 0)
    lg=$(stat -c %s runner.stderr 2>/dev/null || echo 0)
    { [ "$ev" -gt "$ev_off" ] || [ "$lg" -gt "$log_off" ]; } && break
    sleep 0.05 2>/dev/null || break
    ticks=$(( ticks - 1 ))
  done
  # The exit code first: once it is there, the sizes read below are final.
  ec=$(tr -d ' \n' < exit_code 2>/dev/null || true)
  pid=$(cat pid 2>/dev/null || true)
  alive=0
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && alive=1
  beat=$(stat -c %Y heartbeat 2>/dev/null || true)
  age=-
  [ -n "$beat" ] && age=$(( $(date +%s) - beat ))
  bundle=0
  [ -f bundle/manifest.json ] && bundle=1
  printf 'state=present exit=%s pid=%s alive=%s heartbeat_age=%s bundle=%s\n' \
    "${ec:--}" "${pid:--}" "$alive" "$age" "$bundle"
  for pair in "events.jsonl $ev_off" "runner.stderr $log_off"; do
    set -- $pair
    size=$(wc -c < "$1" 2>/dev/null || echo 0)
    n=$(( size - $2 ))
    [ "$n" -lt 0 ] && n=0
    [ "$n" -gt "$most" ] && n=$most
    printf '%s %s\n' "$1" "$n"
    [ "$n" -gt 0 ] && tail -c +$(( $2 + 1 )) "$1" | head -c "$n"
  done
  exit 0
  ;;
cancel)
  remote_dir=$1 run_dir=$2 run_id=$3
  pid=$(cat "$run_dir/pid" 2>/dev/null || true)
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then
    echo not-running
    exit 0
  fi
  kill -TERM "$pid"
  i=0
  while kill -0 "$pid" 2>/dev/null && [ $i -lt 10 ]; do sleep 1; i=$(( i + 1 )); done
  if kill -0 "$pid" 2>/dev/null; then
    child=$(cat "$run_dir/runner.pid" 2>/dev/null || true)
    [ -n "$child" ] && { kill -KILL -- "-$child" 2>/dev/null; kill -KILL "$child" 2>/dev/null; }
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    release_lock "$remote_dir" "$run_id"
    echo killed
  else
    echo cancelled
  fi
  ;;
lock-status)
  lock_info "$1/lock"
  ;;
clear-stale)
  remote_dir=$1 holder=$2
  info=$(lock_info "$remote_dir/lock")
  case $info in
    *"run_id=$holder "*"state=dead") rm -rf "$remote_dir/lock"; echo cleared ;;
    *) echo "$info"; exit 75 ;;
  esac
  ;;
*)
  echo "unknown command: $cmd" >&2
  exit 2
  ;;
esac
"""

DIGEST = hashlib.sha256(SCRIPT.encode("utf-8")).hexdigest()[:12]
NAME = f"jobctl-{DIGEST}.sh"
