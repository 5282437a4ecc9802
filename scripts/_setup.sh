# Shared setup for the repo's scripts (scripts/test, scripts/demo). Source it, then call
# sqlproxy_setup. Works on a fresh Debian 12 machine: installs the Debian packages the test
# suite needs if any are missing, creates .venv and installs the project into it.
#
# After sqlproxy_setup: REPO_ROOT, VENV and VENV_BIN are set and the current dir is REPO_ROOT.
# Environment knobs: PYTHON (interpreter for a new .venv, default: first python3 >= 3.11).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
VENV_BIN="$VENV/bin"
# chromium + chromium-driver: the dashboard's browser test (tests/admin/test_dashboard.py);
# curl + jq: the README's examples, which tests/test_readme.py runs.
SYSTEM_PACKAGES=(postgresql-15 postgresql-contrib pgbouncer redis-server
                 chromium chromium-driver fonts-dejavu-core curl jq)

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

_deb_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# Prints the first interpreter that is >= 3.11 and can build a venv (with pip).
_find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' \
            >/dev/null 2>&1; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

ensure_system_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        log "not a Debian system: install PostgreSQL 15 server binaries, pgbouncer and" \
            "chromium with chromedriver yourself"
        return 0
    fi
    local missing=() pkg
    for pkg in "${SYSTEM_PACKAGES[@]}"; do
        _deb_installed "$pkg" || missing+=("$pkg")
    done
    # A new .venv needs python3 >= 3.11 with venv/ensurepip (Debian splits those out).
    if [ ! -x "$VENV_BIN/python" ] && ! _find_python >/dev/null; then
        missing+=(python3 python3-venv)
    fi
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    log "installing Debian packages: ${missing[*]}"
    _as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
    if [ ! -x "$VENV_BIN/python" ]; then
        local python
        python="$(_find_python)" || die "no python3 >= 3.11 with the venv module found"
        log "creating .venv with $python"
        "$python" -m venv "$VENV"
    fi
    "$VENV_BIN/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$VENV uses Python < 3.11; remove it and rerun"

    # Reinstall only when the packaging or a mypyc-compiled hot-path module changed (or the
    # project is not installed at all): the compiled extensions would otherwise shadow the edit.
    local stamp="$VENV/.sqlproxy-build.sha256" want
    local hot
    hot="$(cd "$REPO_ROOT" && grep -oE 'sqlproxy/[a-z_/]*\.(py|c)' setup.py | tr '\n' ' ')"
    # shellcheck disable=SC2086
    want="$(cd "$REPO_ROOT" && cat pyproject.toml setup.py $hot | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] \
        || ! "$VENV_BIN/python" -c 'import importlib.metadata as m; m.version("sqlproxy")' \
            >/dev/null 2>&1; then
        log "installing sqlproxy[test] into .venv"
        local pip_log="$VENV/pip-install.log"
        # The build compiles hot modules with mypyc, which reads the project's mypy config
        # (pydantic plugin included) and type-checks the modules' imports (pydantic, sqlglot): build
        # inside the venv, with those already installed.
        if ! { "$VENV_BIN/python" -m pip install -q --disable-pip-version-check \
                "setuptools>=68" wheel "mypy>=1.10" "pydantic>=2.6" "sqlglot>=30.0" \
            && "$VENV_BIN/python" -m pip install -q --disable-pip-version-check \
                --no-build-isolation -e "$REPO_ROOT[test]"; } >"$pip_log" 2>&1; then
            cat "$pip_log" >&2
            die "pip install failed (log: $pip_log)"
        fi
        printf '%s\n' "$want" >"$stamp"
    fi
}

# Load tests hold ~1000 clients plus as many server connections in one process; the usual
# soft limit of 1024 descriptors is not enough.
raise_fd_limit() {
    local hard
    hard="$(ulimit -Hn)"
    [ "$hard" = unlimited ] && hard=1048576
    ulimit -n "$hard" 2>/dev/null || true
}

sqlproxy_setup() {
    ensure_system_packages
    ensure_venv
    raise_fd_limit
    cd "$REPO_ROOT"
}
