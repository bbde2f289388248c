# iflow2api in a container: the server on port 28000, its config and logins in the volume /data.
#   docker build -t iflow2api .            (--build-arg WITH_EXTRAS=0: standard library only)
#   docker compose up -d                   (docker-compose.yml explains the first run)
# The image runs the same single file users download: build.py packs dist/iflow2api.pyz in a
# first stage (h11 and certifi at the versions pinned in build.py, fetched with pip), and the
# final stage holds only that file. BASE can be any Debian-like image with python3 (the tests
# use a local debootstrap image: --build-arg BASE=localhost/...).
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
ARG WITH_EXTRAS=1
COPY iflow2api.py iflow2api_gui.py build.py /src/
COPY static /src/static
RUN if [ "$WITH_EXTRAS" = "1" ]; then vendor=--vendor; else vendor=--no-vendor; fi \
 && python3 /src/build.py "$vendor" --output /out/iflow2api.pyz

FROM ${BASE}
# Not root. uid 1000 is the usual first user on a Linux host, so a bind-mounted host folder
# stays readable and writable for both (change with --build-arg UID=...).
ARG UID=1000
# The command `iflow2api` works inside, e.g. docker compose exec iflow2api iflow2api accounts
RUN useradd --create-home --home-dir /data --uid "$UID" --shell /usr/sbin/nologin iflow \
 && chmod 700 /data \
 && ln -s /opt/iflow2api/iflow2api.pyz /usr/local/bin/iflow2api
COPY --from=build /out/iflow2api.pyz /opt/iflow2api/iflow2api.pyz

USER iflow
# HOME is the volume: ~/.iflow/settings.json (the login, in the iFlow CLI's format) and
# ~/.iflow2api (config, client keys, secret key file) both persist there.
ENV HOME=/data IFLOW2API_HOME=/data/.iflow2api PYTHONUNBUFFERED=1 \
    IFLOW2API_HOST=0.0.0.0 IFLOW2API_PORT=28000
# 0.0.0.0 is needed inside the container: published ports arrive on the container's own
# network interface, not on its loopback. What is reachable from outside is decided by
# `ports:` in docker-compose.yml (127.0.0.1 only there). Listening on 0.0.0.0 makes the
# server require client keys; the first start generates one and prints it in the log.
VOLUME ["/data"]
WORKDIR /data
EXPOSE 28000
# Change the port with IFLOW2API_PORT (not --port), so this check follows it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health' % os.environ.get('IFLOW2API_PORT', '28000'), timeout=4)"]

ENTRYPOINT ["iflow2api"]
CMD ["serve"]
