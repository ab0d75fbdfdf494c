# paysvc: slim image, runs as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY paysvc ./paysvc
COPY providers ./providers
COPY ledger ./ledger
COPY migrations ./migrations
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 paysvc
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The migrations also ship inside the wheel; this copy is what `paysvc migrate` reads when PAYSVC_MIGRATIONS_DIR points at it.
COPY migrations /app/migrations
WORKDIR /app
USER paysvc
ENV PAYSVC_HOST=0.0.0.0 \
    PAYSVC_PORT=8080 \
    PAYSVC_DATA_DIR=/app/data \
    PYTHONUNBUFFERED=1
EXPOSE 8080
ENTRYPOINT ["paysvc"]
CMD ["serve"]
