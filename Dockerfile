# The autoembed worker. CPU by default; for CUDA, base on an image with CUDA 12/13 + cuDNN 9
# and `pip install onnxruntime-gpu` in place of onnxruntime.
FROM python:3.12-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY migrations ./migrations
COPY sql ./sql
# editable: the package finds migrations/ and sql/ beside it
RUN pip install --no-cache-dir -e . \
 && useradd --create-home autoembed \
 && mkdir -p /models && chown autoembed /models
USER autoembed
ENV AUTOEMBED_CACHE_DIR=/models \
    PYTHONUNBUFFERED=1
CMD ["autoembed", "run", "--log-format", "json"]
