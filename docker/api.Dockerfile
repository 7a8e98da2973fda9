# The API image: Flask under gunicorn (threaded workers), `genq migrate`, and (target `flower`) Flower.
# Slim Python, no torch: the API only enqueues job ids and reads the database and Redis.
#   docker build -f docker/api.Dockerfile -t genq-api .
# PYTHON_IMAGE: any image whose `python` and `pip` come first on PATH (a mirror's python:3.12-slim,
# or docker/local-bases' stand-in).
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 genq \
    && useradd --system --uid 10001 --gid genq --home-dir /var/lib/genq --create-home --shell /usr/sbin/nologin genq
WORKDIR /opt/genq
COPY docker/requirements-api.txt docker/constraints.txt /tmp/
RUN pip install -r /tmp/requirements-api.txt -c /tmp/constraints.txt
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# --no-deps: the engine's dependencies (torch, ...) stay out; `genq` and the migrations come from the source tree.
RUN pip install --no-deps -e .
USER genq
ENV GENQ_HOME=/var/lib/genq \
    GENQ_API_HOST=0.0.0.0 \
    GENQ_API_PORT=8000 \
    GENQ_LOG_FORMAT=json
EXPOSE 8000
CMD ["genq", "api"]

# Flower (optional, `docker compose --profile flower up`): the API image plus flower.
FROM api AS flower
USER root
RUN pip install "flower>=2" -c /tmp/constraints.txt
USER genq
EXPOSE 5555
CMD ["celery", "--app", "worker.flower:app", "flower", "--address=0.0.0.0", "--port=5555"]
