# paysvc: slim image, runs as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY paysvc ./paysvc
COPY providers ./providers
COPY ledger ./ledger
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 paysvc
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The migrations ship inside the wheel. The data folder (the embedded demo database, demo keys) belongs to the
# service's user: root-owned, the demo run could not create it (found by an operator's walk-through).
RUN mkdir -p /app/data && chown paysvc:paysvc /app/data
WORKDIR /app
USER paysvc
VOLUME /app/data
ENV PAYSVC_HOST=0.0.0.0 \
    PAYSVC_PORT=8080 \
    PAYSVC_DATA_DIR=/app/data \
    PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PAYSVC_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["paysvc"]
CMD ["serve"]
