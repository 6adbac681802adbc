from nex.cli.app import main

main()
