#!/usr/bin/env bash
# Pretraining on a spot / preemptible VM: a loop that starts the run again after a preemption notice.
#
# The run's own resume does the work: `--resume auto` (the default) continues the latest complete checkpoint in
# output_dir. On a notice (SIGTERM, or SIGUSR1) every rank stops at the same point, writes one complete checkpoint and
# exits 75; `accelerate launch`, which got the signal and passed it on, exits 128 + the signal (143, 138). Those codes
# start the same command again; 0 (done) and anything else (a crash) end the loop with that code.
#
# Start it at boot, so that a VM that comes back continues the run, e.g. a systemd unit:
#   [Service]
#   ExecStart=/opt/gpt2custom/recipes/spot_vm_loop.sh
#   KillSignal=SIGTERM
#   TimeoutStopSec=110       # the cloud's notice: about 30 s on some clouds, up to 120 s on others
#   Restart=no
# and set --preempt_deadline_s a few seconds below that notice (below).
set -uo pipefail
cd "$(dirname "$0")/.." 2>/dev/null || true

REQUEUE_CODES="75 143 138"
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1  # the launcher passes SIGUSR1 on to the ranks too
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${GRACE_S:-100}"  # how long the launcher waits for the ranks' save
LAUNCH="${LAUNCH:-accelerate launch --config_file accelerate_configs/ddp_8gpu.yaml pretrain.py --config configs/gpt2-124m.yaml --preempt_deadline_s 90}"

stopping=0
pid=
trap 'stopping=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' TERM INT  # a stop for the loop itself: pass it on
while true; do
    $LAUNCH &
    pid=$!
    while true; do  # a trapped signal interrupts `wait`: wait again until the launch has exited
        wait "$pid"
        rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    case " $REQUEUE_CODES " in
        *" $rc "*)
            if [ "$stopping" = 1 ]; then exit "$rc"; fi
            echo "spot_vm_loop: the run stopped for a notice (exit $rc): starting it again" >&2
            sleep "${RESTART_PAUSE_S:-10}"
            ;;
        *) exit "$rc" ;;
    esac
done
