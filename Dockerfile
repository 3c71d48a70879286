# One image for every horde process; docker-compose.yml picks the command.
# TORCH_INDEX lets a GPU host install a CUDA build; the default is PyPI's.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
COPY setup.cfg pyproject.toml README.md ./
COPY api api
COPY broker broker
COPY consumers consumers
COPY ledger ledger
COPY config config
COPY cli cli
COPY migrations migrations
ARG EXTRAS=worker
RUN pip install --no-cache-dir ".[${EXTRAS}]"
ENTRYPOINT ["horde"]
