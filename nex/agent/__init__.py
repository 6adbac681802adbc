"""The agent: the program that runs inside each machine and runs one workload for its node."""
