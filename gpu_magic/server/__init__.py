"""The gateway: HTTP API, pure scheduler, durable store, auth and backends."""
