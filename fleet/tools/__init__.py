"""Tools built on the controller and the agent: the fleet simulator and the one-machine demo."""
