"""Several upstreams: routing by model, load balancing, circuit breaking,
and retry with fallback before the first token (docs/routing.md)."""
