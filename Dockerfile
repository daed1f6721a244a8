# One image for every process; docker-compose.yml picks the command.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml ./
COPY proxy ./proxy
COPY control_plane ./control_plane
COPY shared ./shared
COPY bench ./bench
RUN pip install --no-cache-dir .
USER nobody
CMD ["rr-proxy"]
