from nex.agent.main import main

main()
