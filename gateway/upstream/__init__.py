"""The way out: HTTP/2 and HTTP/1.1 transports, providers, the SSE decoder."""
