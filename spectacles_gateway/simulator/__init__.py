"""A local Discord gateway simulator: the wire behaviour of Discord's gateway v10 (JSON,
zstd-stream / zlib-stream), its rules and failure modes, for tests, benchmarks and trying the
gateway without a token.

    async with Simulator(SimulatorConfig(shard_count=2, rate=100)) as sim:
        ...  # connect a client to sim.gateway_url (or discover it via sim.http_base)
        sim.inject(0, Reconnect())
        await sim.wait_for(lambda ledger: ledger.resume_count(0, success=True) == 1, 10)

Beyond Discord's normal behaviour: hostile faults (:class:`DecompressionBomb`,
:class:`FragmentedMessage`, :class:`DeepNesting`, :class:`AbsurdHello`, and for the REST side
:meth:`Simulator.inject_rest` with :class:`GatewayBotRedirect`, :class:`InsecureGatewayUrl`),
a realistic traffic profile (``SimulatorConfig(profile="realistic", seed=...)``), paced
arrivals per shard, a growing bot (``guilds``, ``guild_rate``,
:meth:`Simulator.set_recommended_shards`, ``ledger.missing_guild_events``), and what the
ledger says about failover (``ledger.overlap_seconds``).

Command line: ``spectacles-simulator --help``.
"""

from spectacles_gateway.simulator.config import SimulatorConfig
from spectacles_gateway.simulator.connection import new_zstd_compressor
from spectacles_gateway.simulator.faults import (
    AbsurdHello,
    Close,
    CorruptCompressed,
    DecompressionBomb,
    DeepNesting,
    Drop,
    Fault,
    FragmentedMessage,
    GatewayBotRedirect,
    HeartbeatRequest,
    InsecureGatewayUrl,
    InvalidSession,
    MalformedJson,
    Op7BeforeHello,
    Reconnect,
    RestFault,
    UnknownDispatch,
    UnknownOpcode,
    WithholdAcks,
)
from spectacles_gateway.simulator.ledger import (
    CommandRecord,
    ConnectionRecord,
    DispatchLog,
    FaultRecord,
    GuildEventLog,
    HeartbeatRecord,
    HttpRecord,
    IdentifyRecord,
    Ledger,
    ReceivedRecord,
    ResumeRecord,
)
from spectacles_gateway.simulator.rest import RESUME_PATH
from spectacles_gateway.simulator.server import Simulator

__all__ = [
    "RESUME_PATH",
    "AbsurdHello",
    "Close",
    "CommandRecord",
    "ConnectionRecord",
    "CorruptCompressed",
    "DecompressionBomb",
    "DeepNesting",
    "DispatchLog",
    "Drop",
    "Fault",
    "FaultRecord",
    "FragmentedMessage",
    "GatewayBotRedirect",
    "GuildEventLog",
    "HeartbeatRecord",
    "HeartbeatRequest",
    "HttpRecord",
    "IdentifyRecord",
    "InsecureGatewayUrl",
    "InvalidSession",
    "Ledger",
    "MalformedJson",
    "Op7BeforeHello",
    "ReceivedRecord",
    "Reconnect",
    "RestFault",
    "ResumeRecord",
    "Simulator",
    "SimulatorConfig",
    "UnknownDispatch",
    "UnknownOpcode",
    "WithholdAcks",
    "new_zstd_compressor",
]
