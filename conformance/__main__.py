"""``python -m conformance --host H --port P --aet AE [--calling-aet AE] [--junit FILE]``."""

from __future__ import annotations

import sys

from conformance.kit import main

sys.exit(main())
