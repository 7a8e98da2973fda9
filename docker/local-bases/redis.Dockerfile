# Stands in for redis:7.4-alpine: Debian's redis-server and redis-cli, data in /data, run as `redis`.
FROM genq-local/debian:bookworm
RUN apt-get update \
    && apt-get install -y redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no"]
