# Stands in for postgres:17-alpine: Debian's PostgreSQL 15, with an entrypoint that honours what the
# official image's does for genq: POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB on first start
# (an empty PGDATA), password authentication over TCP, the server in the foreground as `postgres`.
FROM genq-local/debian:bookworm
RUN apt-get update \
    && apt-get install -y postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && chmod 700 /var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint.sh"]
CMD ["postgres"]
