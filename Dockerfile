# onnxforge images. Two targets on the same steps:
#   docker build --target cpu -t onnxforge:cpu .   (the default: python slim + onnxruntime)
#   docker build --target gpu -t onnxforge:gpu .   (NVIDIA CUDA 13 + cuDNN 9 runtime + onnxruntime-gpu 1.31)
# onnxruntime-gpu 1.31 on PyPI is built against CUDA 13.x and cuDNN 9.x (its `cuda`/`cudnn` extras
# name nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0), so the GPU base is CUDA 13 with cuDNN 9.
# Dependencies are installed before the code is copied: a code change rebuilds only the last layers. Their versions
# are deploy/constraints.txt's (the ones the tests ran on): a rebuild does not pick up new releases unseen.
# Every dependency ships binary wheels, so no compiler is needed in any stage.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG ORT_GPU_VERSION=1.31.1
# The CPU image's ONNX Runtime, pinned like the GPU one: the version the tests and benchmarks ran on, so a
# rebuild does not change the kernels (and the INT8 choices timed with them) behind the same tag.
ARG ORT_VERSION=1.32.0

# ---- CPU --------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu-build
ARG ORT_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/constraints.txt ./deploy/
# Install only the dependencies (empty packages stand in for the code), then drop the stand-in.
# hadolint ignore=DL3013
RUN mkdir app optimizer && touch app/__init__.py optimizer/__init__.py \
    && pip install -c deploy/constraints.txt ".[cpu,postgres,s3]" "onnxruntime==${ORT_VERSION}" \
    && pip uninstall -y onnxforge && rm -rf app optimizer
COPY app ./app
COPY optimizer ./optimizer
RUN pip install --no-deps . && rm -rf build

# ---- GPU --------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS gpu-base
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM gpu-base AS gpu-build
ARG ORT_GPU_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/constraints.txt ./deploy/
# hadolint ignore=DL3013
RUN mkdir app optimizer && touch app/__init__.py optimizer/__init__.py \
    && pip install -c deploy/constraints.txt ".[gpu,postgres,s3]" "onnxruntime-gpu==${ORT_GPU_VERSION}" \
    && pip uninstall -y onnxforge && rm -rf app optimizer
COPY app ./app
COPY optimizer ./optimizer
RUN pip install --no-deps . && rm -rf build

FROM gpu-base AS gpu
RUN useradd --system --uid 10001 --create-home onnxforge && mkdir -p /data && chown onnxforge /data
COPY --from=gpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    ONNXFORGE_DATA_DIR=/data ONNXFORGE_HOST=0.0.0.0 ONNXFORGE_PORT=8000 ONNXFORGE_PROVIDERS=cuda
USER 10001
WORKDIR /home/onnxforge
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['ONNXFORGE_PORT'], timeout=2)"]
ENTRYPOINT ["onnxforge"]
CMD ["serve"]

# ---- CPU final (last, so a plain `docker build .` gives it) -------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --system --uid 10001 --create-home onnxforge && mkdir -p /data && chown onnxforge /data
COPY --from=cpu-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    ONNXFORGE_DATA_DIR=/data ONNXFORGE_HOST=0.0.0.0 ONNXFORGE_PORT=8000 ONNXFORGE_PROVIDERS=cpu
USER 10001
WORKDIR /home/onnxforge
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['ONNXFORGE_PORT'], timeout=2)"]
ENTRYPOINT ["onnxforge"]
CMD ["serve"]
