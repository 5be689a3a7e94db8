"""What the simulated Discord application and gateway node look like."""

from __future__ import annotations

from dataclasses import dataclass

from spectacles_gateway.simulator import events

PROFILES = ("uniform", "realistic")


@dataclass
class SimulatorConfig:
    """Everything the simulated Discord application and gateway node look like."""

    token: str = "simulated-token"  # noqa: S105 - the simulated app's fake token
    shard_count: int = 1
    """Recommended count from /gateway/bot; IDENTIFY's num_shards is checked against it."""
    max_concurrency: int = 1
    session_start_total: int = 1000
    session_start_remaining: int = 1000
    session_start_reset_after_ms: int = 14_400_000
    heartbeat_interval_ms: int = 41250
    rate: float = 0.0
    """Generated dispatches per second per connected READY session (0 = none), each session
    at its own random phase, with ``jitter``."""
    profile: str = "uniform"
    """``uniform``: MESSAGE_CREATEs of the ``size_mix`` sizes (compress about 40:1);
    ``realistic``: a busy bot's mix of events from a pool built from ``seed`` (about 6:1)."""
    seed: int = 0
    """Seed of the realistic pool and of the arrival phases and jitter: runs repeat."""
    jitter: float = 0.25
    """Each interval between two generated events is ``1/rate`` times ``1 ± jitter``."""
    corpus_pool: int = 4096
    """Templates in the realistic pool."""
    size_mix: tuple[tuple[int, float], ...] = ((1024, 1.0),)
    """(approximate JSON size of ``d`` in bytes, weight) for generated MESSAGE_CREATEs."""
    guilds_per_shard: int = 2
    """Without ``guilds``: each new session gets this many guilds of its own."""
    guilds: int = 0
    """A growing bot: this many guilds, placed by ``(guild_id >> 22) % num_shards``; every
    session gets GUILD_CREATE for the guilds its ``[shard_id, num_shards]`` owns."""
    guild_ids: tuple[int, ...] = ()
    """Or the bot's guilds by id (instead of ``guilds`` generated ones)."""
    guild_rate: float = 0.0
    """With ``guilds``: events per second per guild, delivered to every live session whose
    shard owns the guild (old and new generation alike)."""
    max_guilds_per_shard: int = 2500
    """With ``guilds``: IDENTIFY for a shard that would own more is closed with 4011."""
    big_guild_create_bytes: int = 0
    """If > 0, the first GUILD_CREATE of each new session is at least this big."""
    allowed_privileged: int = events.PRIVILEGED_INTENTS
    resume_window: float = 180.0
    identify_window: float = 5.0
    send_limit: tuple[int, float] = (120, 60.0)
    host: str = "127.0.0.1"
    port: int = 0
    # Beyond the common API:
    strict_shard_count: bool | None = None
    """4010 unless IDENTIFY's num_shards equals the recommended count. Default: on, except
    for a growing bot (``guilds``/``guild_ids``), where any count that keeps each shard
    within ``max_guilds_per_shard`` is fine, as on Discord."""
    required_shards: int = 0
    """If > 0, IDENTIFY with fewer shards than this gets 4011 (sharding required)."""
    heartbeat_timeout_factor: float = 1.5
    """Close 4009 when no heartbeat arrives for interval x factor (0 disables)."""
    reconnect_close_after: float = 5.0
    """After op 7, close the connection (4000) if the client hasn't (0 disables)."""
    zlib_split_over: int = 65536
    """zlib-stream: a message compressing to more than this goes out in 2 websocket messages."""
    ws_fragment_over: int = 0
    """If > 0, websocket messages larger than this are sent as 2 frames (continuation)."""
    api_versions: tuple[int, ...] = (9, 10)
    zstd_level: int = 3
    tick: float = 0.01
    """Unused since each session's events are paced on their own (see ``jitter``); kept so
    configurations that set it still load."""
    close_timeout: float = 2.0
    """Seconds the server waits for the client's answer to its close frame before it drops
    the TCP connection."""
    superseded_close_code: int = 4000
    """Close code for a connection whose session was RESUMEd on another one. Discord closes
    the older connection but documents no code for it; 4000 (unknown error, resumable) is
    this simulator's choice."""
    trace_name: str = "gateway-sim-local-1"
    member_request_limit: bool = True
    """Op 8 for all members (query "" and limit 0): one per guild per 30 s, else RATE_LIMITED."""
    tls: bool = False
    """Serve ``https://`` and ``wss://`` with a throwaway self-signed certificate
    (:attr:`Simulator.tls_ca_file`: give it to clients as their CA file)."""
    expected_connections: int = 0
    """Connections to size the open-file limit for (0: twice ``shard_count``: an old and a new
    generation side by side). At start the simulator raises its soft limit to the hard one and
    warns when that is too low."""
    record_traffic: bool = True
    """Keep every received payload and heartbeat in the ledger (``received``, ``heartbeats``);
    off in the CLI, where nothing reads them and a long run would only grow."""
    other_host: str = "127.0.0.2"
    """Address of a second, plain listener: "another host" for redirect and ``ws://`` faults
    ("" for none; if it cannot be bound, the simulator goes on without it)."""

    def __post_init__(self) -> None:
        if self.shard_count < 1 or self.max_concurrency < 1:
            raise ValueError("shard_count and max_concurrency must be >= 1")
        if not self.size_mix or any(s <= 0 or w < 0 for s, w in self.size_mix):
            raise ValueError("size_mix needs (size > 0, weight >= 0) entries")
        if self.rate < 0:
            raise ValueError("rate must be >= 0")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {', '.join(PROFILES)}, not {self.profile!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if self.corpus_pool < 1:
            raise ValueError("corpus_pool must be >= 1")
        if self.guilds < 0 or self.guild_rate < 0 or self.max_guilds_per_shard < 1:
            raise ValueError("guilds and guild_rate must be >= 0, max_guilds_per_shard >= 1")
        if self.strict_shard_count is None:
            self.strict_shard_count = not self.growing

    @property
    def growing(self) -> bool:
        """A growing bot: guilds of its own, placed on the shards by id."""
        return bool(self.guilds or self.guild_ids)
