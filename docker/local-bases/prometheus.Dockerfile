# Stands in for prom/prometheus: Debian's prometheus, the binary as the entrypoint (the compose file
# passes flags as the command, as to the official image), data in /prometheus, run as `nobody`.
FROM genq-local/debian:bookworm
RUN apt-get update \
    && apt-get install -y prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus /etc/prometheus && chown nobody:nogroup /prometheus
WORKDIR /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
