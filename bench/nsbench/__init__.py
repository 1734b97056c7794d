"""Helpers of bench/forward_bench.py: namespace, servers, forwarder rows, measurements, report."""
