# worldserve for a GPU box (first version: runs an offline rollout; the server issue makes `serve` the command).
# Build:  docker build -t worldserve .
# Run:    docker run --rm --gpus all -v "$PWD/out:/out" worldserve
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 worldserve
WORKDIR /app

# PyPI's Linux torch wheel is the CUDA build; faiss-gpu comes with the `gpu` extra.
RUN pip install "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY engine engine
COPY server server
COPY client client
# The project itself, from this folder (DL3013 asks to pin PyPI packages; its dependencies are ranged in pyproject).
# hadolint ignore=DL3013
RUN pip install ".[gpu]"
COPY configs configs

USER 10001
# Weights and configs are mountable: -v /path/to/configs:/app/configs -v /path/to/weights:/app/weights
VOLUME ["/out"]
CMD ["worldserve", "rollout", "--config", "configs/default.yaml", "--frames", "64", "--out", "/out"]
