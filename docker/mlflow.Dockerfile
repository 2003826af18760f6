# The MLflow tracking server of docker-compose.yml: PostgreSQL backend (psycopg2), proxied
# artifacts on S3/MinIO (boto3), basic auth (mlflow[auth] brings Flask-WTF, which the
# basic-auth app imports for its CSRF protection and refuses to start without).
# Build context: this directory (nothing of the project is copied in).
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Same MLflow as the project's drivers and workers (pinned in docker/ray.Dockerfile too).
RUN pip install \
        "mlflow[auth]==3.17.2" \
        "Flask-WTF==1.3.0" \
        "psycopg2-binary==2.9.13" \
        "boto3==1.44.5"

# No root at run time; the server writes nothing but temporary files.
RUN useradd --create-home --uid 1000 mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
# The command line lives in docker-compose.yml (services.mlflow.command).
CMD ["mlflow", "server", "--help"]
