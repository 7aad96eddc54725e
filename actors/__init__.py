"""Coalescing machinery: one actor per prompt key. Knows nothing of HTTP."""
