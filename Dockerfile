# iflow2api in a container.
#   docker build -t iflow2api .                  (add --build-arg WITH_EXTRAS=0 for stdlib only)
#   docker compose up -d                         (see docker-compose.yml for the mounts)
# Only iflow2api.py and static/ are copied in (.dockerignore lists them), so a checkout
# without static/ builds too.
FROM python:3.12-slim

# Optional: h11 (stricter, faster HTTP parsing) and certifi (Mozilla's CA bundle), pinned
# like tests/requirements.txt. The server runs without them.
ARG WITH_EXTRAS=1
RUN if [ "$WITH_EXTRAS" = "1" ]; then pip install --no-cache-dir h11==0.16.0 certifi==2026.5.20; fi

# Not root. uid 1000 is the usual first user on a Linux host, so a bind-mounted ~/.iflow
# stays readable and writable for both (change with --build-arg UID=...).
ARG UID=1000
RUN useradd --create-home --home-dir /home/iflow --uid "$UID" --shell /usr/sbin/nologin iflow \
 && mkdir -m 700 /home/iflow/.iflow /home/iflow/.iflow2api \
 && chown iflow:iflow /home/iflow/.iflow /home/iflow/.iflow2api

WORKDIR /app
COPY . /app/
USER iflow
ENV HOME=/home/iflow PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# ~/.iflow: the iFlow CLI's credentials (settings.json); ~/.iflow2api: our config and keys.
VOLUME ["/home/iflow/.iflow", "/home/iflow/.iflow2api"]

EXPOSE 28000
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:28000/health', timeout=4)"]

# 0.0.0.0 is needed inside the container: Docker forwards published ports to the
# container's own network interface, not to its loopback. What is reachable from outside
# is decided by `ports:` in docker-compose.yml (127.0.0.1 only by default).
CMD ["python", "iflow2api.py", "--host", "0.0.0.0", "--port", "28000"]
