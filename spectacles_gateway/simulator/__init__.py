"""A local Discord gateway simulator: the wire behaviour of Discord's gateway v10 (JSON,
zstd-stream / zlib-stream), its rules and failure modes, for tests, benchmarks and trying the
gateway without a token.

    async with Simulator(SimulatorConfig(shard_count=2, rate=100)) as sim:
        ...  # connect a client to sim.gateway_url (or discover it via sim.http_base)
        sim.inject(0, Reconnect())
        await sim.wait_for(lambda ledger: ledger.resume_count(0, success=True) == 1, 10)

Command line: ``spectacles-simulator --help``.
"""

from spectacles_gateway.simulator.ledger import (
    CommandRecord,
    ConnectionRecord,
    DispatchLog,
    FaultRecord,
    HeartbeatRecord,
    HttpRecord,
    IdentifyRecord,
    Ledger,
    ReceivedRecord,
    ResumeRecord,
)
from spectacles_gateway.simulator.server import (
    RESUME_PATH,
    Close,
    CorruptCompressed,
    Drop,
    Fault,
    HeartbeatRequest,
    InvalidSession,
    MalformedJson,
    Op7BeforeHello,
    Reconnect,
    Simulator,
    SimulatorConfig,
    UnknownDispatch,
    UnknownOpcode,
    WithholdAcks,
    new_zstd_compressor,
)

__all__ = [
    "RESUME_PATH",
    "Close",
    "CommandRecord",
    "ConnectionRecord",
    "CorruptCompressed",
    "DispatchLog",
    "Drop",
    "Fault",
    "FaultRecord",
    "HeartbeatRecord",
    "HeartbeatRequest",
    "HttpRecord",
    "IdentifyRecord",
    "InvalidSession",
    "Ledger",
    "MalformedJson",
    "Op7BeforeHello",
    "ReceivedRecord",
    "Reconnect",
    "ResumeRecord",
    "Simulator",
    "SimulatorConfig",
    "UnknownDispatch",
    "UnknownOpcode",
    "WithholdAcks",
    "new_zstd_compressor",
]
