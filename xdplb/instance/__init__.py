"""One balancer instance's places outside the maps' contents: its pins in bpffs and the
run files its agent publishes (pid, config, health, drains)."""
