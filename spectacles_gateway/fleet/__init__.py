"""Fleet mode: several supervisors (members) share one bot's shards through Redis (fleet.md)."""
