# Stand-in for rabbitmq:3-management from Debian's rabbitmq-server (tests/dockerengine.py): the
# management plugin enabled, AMQP on 5672 and the UI on 15672, data in /var/lib/rabbitmq, the
# guest user allowed from other containers (as in the official image), and
# rabbitmq-diagnostics for the compose file's health check. The node name follows the
# container's hostname (compose sets `hostname: rabbitmq`).
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends rabbitmq-server \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && rabbitmq-plugins enable --offline rabbitmq_management \
    && printf '%s\n' 'loopback_users.guest = false' 'listeners.tcp.default = 5672' \
       'management.tcp.port = 15672' > /etc/rabbitmq/rabbitmq.conf \
    && chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /etc/rabbitmq

ENV RABBITMQ_LOGS=- \
    HOME=/var/lib/rabbitmq
WORKDIR /var/lib/rabbitmq
VOLUME /var/lib/rabbitmq
# The package's own system user (its uid is chosen at install), as in the official image.
# hadolint ignore=DL3066
USER rabbitmq
EXPOSE 5672 15672
CMD ["/usr/lib/rabbitmq/bin/rabbitmq-server"]
