"""``python -m spectacles_gateway.simulator``: same as ``spectacles-simulator``."""

from spectacles_gateway.simulator.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
