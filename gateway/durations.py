"""The longest duration any setting may name, in the environment or in the
routing file: one day.

Each becomes float seconds for an asyncio timer (an integer past 1e308 ms
has none), and the lease and error TTL a Redis expiry (``PX``: a signed
64-bit count of milliseconds, refused once now plus it overflows); a value
those refuse would pass the start and then fail every claim, or the start
with a traceback. No deadline, interval, cooldown or lease of a gateway
needs more than a day, and none is infinite.
"""

MAX_DURATION_MS = 86_400_000
MAX_DURATION_S = MAX_DURATION_MS / 1000
