# Ray head and GPU workers of docker-compose.yml: this project installed on a pinned Python with
# Ray pinned. A Ray driver (orchestrator sweep, a Ray Job's entrypoint) and its cluster must run
# the same Ray version, and Ray Client also the same Python minor version (3.11).
# Build context: the repository root (see docker-compose.yml). Only pyproject.toml, README.md,
# diffusion/ and orchestrator/ are copied in.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A non-root user, and the layout of the shared volume (/shared): Tune's storage and the model
# cache under /shared/ray_results, the feature-extractor cache (eval.cache_dir, default
# ~/.cache/diffusion-orchestrator) linked to /shared/cache so every node sees one copy.
# An empty named volume mounted on /shared starts as a copy of this directory.
RUN useradd --create-home --uid 1000 ray \
 && mkdir -p /shared/ray_results /shared/cache/diffusion-orchestrator /home/ray/.cache \
 && ln -s /shared/cache/diffusion-orchestrator /home/ray/.cache/diffusion-orchestrator \
 && chown -R ray:ray /shared /home/ray/.cache

WORKDIR /opt/diffusion-orchestrator
COPY pyproject.toml README.md ./
COPY diffusion ./diffusion
COPY orchestrator ./orchestrator
# torch's Linux wheels carry their CUDA runtime; the host's NVIDIA driver comes in through the
# container toolkit (deploy.resources.reservations.devices in docker-compose.yml).
RUN pip install \
        "ray[default,tune]==2.60.0" \
        "mlflow==3.17.2" \
        "torch==2.14.1" \
        "torchvision==0.29.1" \
        -e .

USER ray
WORKDIR /home/ray
# The command line lives in docker-compose.yml (ray start --head / ray start --address).
CMD ["ray", "--help"]
