# One image for everything Keel runs in docker-compose.yml: the worker (default), the
# scripted model server and the `keel` CLI.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KEEL_HOME=/data

# A fixed uid, so a volume's ownership means the same thing in every container built from this.
RUN groupadd --system --gid 10001 keel \
 && useradd --system --uid 10001 --gid keel --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin keel \
 && mkdir -p /data \
 && chown keel:keel /data

WORKDIR /app

# Dependencies get their own layer, so a code change does not reinstall them.
COPY pyproject.toml ./
# The `s3` and `otel` extras are included, so KEEL_PAYLOAD_S3_BUCKET and KEEL_TRACING work in
# any container.
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; print('\n'.join(p['dependencies'] + x['s3'] + x['otel']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Installed, then the source removed: the repository's keel/ folder must not shadow the
# installed package (whose keel.workflows, keel.activities and keel.client it maps in).
COPY . /src
RUN pip install --no-deps /src && rm -rf /src

USER keel
# Keel's state (the demo ledger, ledger.db). Declared after the chown so a new named volume
# starts out owned by keel.
VOLUME ["/data"]

CMD ["keel", "worker"]
