# The flow-run image for container work pools (ECS, Cloud Run): code in /opt/paylater, pinned deps.
# Build: docker build --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t paylater-flows:$(git rev-parse --short HEAD) .
FROM python:3.11-slim-bookworm

# The commit the image was built from, logged with every MLflow run (.git is not copied).
ARG GIT_COMMIT=unknown

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    PAYLATER_CODE_DIR=/opt/paylater \
    PAYLATER_HOME=/var/lib/paylater \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PAYLATER_GIT_COMMIT=${GIT_COMMIT}

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 git \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir uv

WORKDIR /opt/paylater
COPY requirements.lock pyproject.toml README.md ./
RUN uv pip install --system --no-cache -r requirements.lock
COPY . .
RUN uv pip install --system --no-cache --no-deps -e .

# Prefect's worker overrides the command with the flow-run entrypoint.
CMD ["prefect", "version"]
