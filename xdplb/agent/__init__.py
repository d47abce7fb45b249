"""The long-lived agent: attach, keep the maps equal to config + health + drains, serve
metrics. Writes what readers (``xdplb.inspect``) read."""
