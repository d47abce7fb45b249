"""Readers of a running (or kept) balancer: status, flows, stats, backends, trace. They read
pins and published run files only, never the agent's code."""
