# Stands in for python:3.12-slim: Debian's Python 3.11 in a virtual environment first on PATH, so that
# `python` and `pip` are the image's as they are in the official one.
FROM genq-local/debian:bookworm
RUN apt-get update \
    && apt-get install -y python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /usr/local/python \
    && /usr/local/python/bin/pip install --no-cache-dir --upgrade pip
ENV PATH=/usr/local/python/bin:$PATH \
    PYTHONUNBUFFERED=1
CMD ["python3"]
