# Debian from debootstrap (build.sh imports it as genq-local/debian-rootfs), plus this host's CA
# certificates: the build context is a folder holding ca/*.crt.
FROM genq-local/debian-rootfs:bookworm
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates >/dev/null
ENV LANG=C.UTF-8
