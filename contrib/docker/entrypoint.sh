#!/bin/sh
# The image's entry point: `balancer node "$@"`, but a node told to create a ring (--ring) joins an
# existing one instead when one of BALANCER_PEERS (space-separated HOST:PORT) answers `balancer status`.
# Without this, the node that bootstrapped the ring would, once restarted, found a second ring of its
# own beside the first: its peers have dropped it as failed, and Chord rings never merge.
# Only for rings served without TLS (`balancer status` here does not pass --tls-ca).
set -eu

case " $* " in
*" --ring "*)
    for peer in ${BALANCER_PEERS:-}; do
        if balancer status "$peer" --timeout 2 >/dev/null 2>&1; then
            echo "balancer-entrypoint: $peer answers: joining its ring instead of creating one" >&2
            for arg do
                shift
                if [ "$arg" = --ring ]; then set -- "$@" --join "$peer"; else set -- "$@" "$arg"; fi
            done
            break
        fi
    done
    ;;
esac

# exec: balancer becomes PID 1 and receives SIGTERM itself, so `docker stop` leaves the ring gracefully.
exec balancer node "$@"
