"""Latency, memory and energy measurement (device and host). numpy only."""
