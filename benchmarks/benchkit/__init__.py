"""The benchmark's machinery: its environment, the servers it starts, the loads, the report."""
