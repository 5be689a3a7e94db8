# Stand-in for python:3.11-slim, built from Debian's packages when no registry is reachable
# (tests/dockerengine.py). The base is a debootstrapped Debian imported as local/debian:bookworm;
# the build context's ca-certificates/ holds the extra CA certificates the host trusts.
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8

COPY ca-certificates/ /usr/local/share/ca-certificates/
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
       python3-pip python-is-python3 \
    && update-ca-certificates \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

CMD ["python3"]
