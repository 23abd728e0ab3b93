from protsae_cli.cli.app import main

main()
