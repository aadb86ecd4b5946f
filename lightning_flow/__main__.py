from lightning_flow.cli import main

main()
