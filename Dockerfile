# worldserve game server for a GPU box: CUDA PyTorch from PyPI, faiss-gpu, non-root, health-checked on /healthz.
# Build:  docker build -t worldserve .
# Run:    docker run --rm --gpus all -p 8000:8000 --stop-timeout 30 worldserve
# Settings are WORLDSERVE_* variables (server/settings.py) or `worldserve serve` flags; flags win. Change the port
# with WORLDSERVE_PORT (not --port) so that the HEALTHCHECK follows it. Configs and weights are mountable:
#   -v "$PWD/configs:/app/configs:ro" -v "$PWD/weights:/app/weights:ro"
# A config names its weights with runtime.checkpoint, relative to the config's folder (../weights/model.safetensors);
# the shipped default model is baked in (models/, which configs/default.yaml names as ../models/default.safetensors).

# The browser client's one npm dependency (msgpack), exactly as client/web/package-lock.json pins it. The server
# serves client/web/node_modules with the page; the final image takes the folder and no Node.
FROM node:20-bookworm-slim AS web
WORKDIR /web
COPY client/web/package.json client/web/package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Triton compiles its CUDA launcher with a C compiler at run time (the AnnSA kernel on cuda), so gcc stays in.
# Versions are not pinned (DL3008): Debian's security updates replace the pinned packages and the build would break.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 worldserve \
    && useradd --uid 10001 --gid worldserve --create-home --no-log-init worldserve
WORKDIR /app

# Dependencies first, so that a code change does not reinstall them. PyPI's Linux torch wheel is the CUDA build
# (the version scripts/setup_env.sh installs); the rest are the project's dependencies plus the `gpu` extra.
RUN pip install "torch==2.13.0"
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['gpu'], sep=chr(10))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself with the `gpu` extra (faiss-gpu); its dependencies are already there. client/web, with the
# node_modules of the web stage, is package data. DL3013 asks to pin PyPI packages: this is the local project, whose
# dependencies are ranged in pyproject.
COPY README.md ./
COPY engine engine
COPY server server
COPY client client
COPY --from=web /web/node_modules client/web/node_modules
# hadolint ignore=DL3013
RUN pip install ".[gpu]" \
    && rm -rf build worldserve.egg-info
COPY configs configs
COPY models models
RUN mkdir weights

ENV WORLDSERVE_HOST=0.0.0.0 \
    WORLDSERVE_PORT=8000 \
    WORLDSERVE_CONFIG=/app/configs/default.yaml
USER 10001:10001
EXPOSE 8000
# Liveness: /healthz answers 503 when the engine thread has stalled (urlopen then raises). The start period covers
# model load and warm-up, during which the port is not open yet.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('WORLDSERVE_PORT', '8000'), timeout=4)"]
# On SIGTERM the server closes every session with code 4012 before it exits; give it time (--stop-timeout 30).
CMD ["worldserve", "serve", "--host", "0.0.0.0"]
