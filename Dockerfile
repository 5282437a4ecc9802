# sqlproxy in a container: `sqlproxy serve`, configured by SQLPROXY_* environment variables
# and/or a TOML file mounted at /etc/sqlproxy/sqlproxy.toml (see config/).
#
#   docker build -t sqlproxy .
#   docker run --rm -p 6432:6432 -p 8080:8080 \
#       -e SQLPROXY_PROXY__PRIMARY=postgresql://app:secret@db.internal:5432/app \
#       -e SQLPROXY_ADMIN__TOKEN=change-me sqlproxy
#
# The admin API listens on 0.0.0.0 in the container, so sqlproxy refuses to start without
# admin.token (SQLPROXY_ADMIN__TOKEN); /healthz needs no token.
#
# Build argument EXTRAS: optional dependency groups to install ("demo" adds SQLAlchemy for
# `python -m sqlproxy.demo.app`, the example app of docker-compose.yml; "" for none).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
# gcc for the mypyc-compiled hot path (setup.py); the Python headers come with the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/sqlproxy
ENV PATH=/opt/sqlproxy/bin:$PATH
# mypyc reads the project's mypy configuration (pydantic plugin) and type-checks the compiled
# modules against their imports (sqlglot, ...): build inside the venv, with the build
# requirements and the dependencies already installed there. So: first an interpreted install
# (SQLPROXY_NO_MYPYC=1) for the dependencies, then the compiled build over it.
RUN pip install "setuptools>=68" wheel "mypy>=1.10" "pydantic>=2.6"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sqlproxy ./sqlproxy
ARG EXTRAS=demo
RUN SQLPROXY_NO_MYPYC=1 pip install --no-build-isolation ".${EXTRAS:+[$EXTRAS]}" \
    && rm -rf build \
    && pip install --no-build-isolation --no-deps --force-reinstall . \
    && pip uninstall -y mypy mypy_extensions wheel setuptools \
    && cd / && python -c "import sqlproxy.wire.conversation as c; assert c.__file__.endswith('.so'), c.__file__"

# -------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 sqlproxy \
    && useradd --system --uid 10001 --gid sqlproxy --no-create-home \
        --home-dir /var/lib/sqlproxy --shell /usr/sbin/nologin sqlproxy \
    && install -d -o sqlproxy -g sqlproxy -m 0750 /var/lib/sqlproxy \
    && install -d -m 0755 /etc/sqlproxy
COPY --from=build /opt/sqlproxy /opt/sqlproxy
COPY docker/sqlproxy.toml /etc/sqlproxy/sqlproxy.toml
ENV PATH=/opt/sqlproxy/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SQLPROXY_CONFIG=/etc/sqlproxy/sqlproxy.toml
USER sqlproxy:sqlproxy
WORKDIR /var/lib/sqlproxy
# Statistics, slow log and findings survive restarts here (state.path).
VOLUME ["/var/lib/sqlproxy"]
EXPOSE 6432 8080
# `sqlproxy healthcheck` asks /healthz at the configured admin.listen: healthy when the proxy
# accepts connections and the primary answers.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["sqlproxy", "healthcheck", "--timeout", "4"]
# SIGTERM (docker stop) drains sessions for up to proxy.shutdown_grace_seconds: give
# `docker stop` at least that long (--time / stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["sqlproxy", "serve"]
CMD []
