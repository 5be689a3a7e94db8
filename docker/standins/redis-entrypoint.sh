#!/bin/sh
# As the official redis image: redis-server without a config file listens on every interface
# with protected mode off; any other command runs as given.
set -e
if [ "$1" = "redis-server" ]; then
    shift
    set -- redis-server --protected-mode no "$@"
fi
exec "$@"
