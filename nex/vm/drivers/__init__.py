"""Machine drivers: how a machine's sandbox is made, started, stopped and described."""
