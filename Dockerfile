# The operator's image: `docker build -t REGISTRY/dask-memory-operator:0.1.0 .`
# (the Helm chart's image.repository / image.tag). tests/test_chart.py runs these
# install steps in a fresh venv (no docker daemon there) and starts the entrypoint.

# --- builder: the project as one wheel, without its dependencies -----------------
FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY amm_core/ amm_core/
COPY operator/ operator/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime: the wheel and its runtime dependencies only (no sandbox/test extras) --
FROM python:3.11-slim
# HOME in /tmp: the chart mounts an emptyDir there on a read-only root filesystem
# (dask writes its default config under ~/.config/dask when it can).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
COPY --from=builder /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# A numeric non-root user, so that `runAsNonRoot` can be verified by the kubelet.
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["dask-memory-operator"]
CMD ["run"]
