"""llm-stream-gateway: the HTTP face, the upstream client and the simulator."""
