"""Default plugins that ship with balancer; each module here is registered like a third-party plugin."""
