"""Sans-I/O Discord gateway protocol: bytes and the current time in, decisions out.

Nothing in this package reads a clock, opens a socket or touches asyncio; the I/O drivers in
:mod:`spectacles_gateway.transport` feed it and carry out what it returns.
"""
