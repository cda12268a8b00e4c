from clcli.cli import main

main()
