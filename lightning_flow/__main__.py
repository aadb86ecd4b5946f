"""``python -m lightning_flow fit|validate|test|predict ...`` (LightningCLI) or ``... trace ...``."""

import sys

if len(sys.argv) > 1 and sys.argv[1] == "trace":
    from lightning_flow.trace_cli import main as trace_main

    trace_main(sys.argv[2:])
else:
    from lightning_flow.cli import main

    main()
