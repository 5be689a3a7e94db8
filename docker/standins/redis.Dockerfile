# Stand-in for redis:7.4-alpine from Debian's redis-server (tests/dockerengine.py): same port,
# data directory and command shape. Like the official image it turns protected mode off when the
# command is redis-server (the container's network is the boundary); redis-cli is there for the
# compose file's health check.
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && install -d -o redis -g redis /data

COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
VOLUME /data
# The package's own system user (its uid is chosen at install), as in the official image.
# hadolint ignore=DL3066
USER redis
EXPOSE 6379
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["redis-server"]
