from aicc.cli.main import main

main()
