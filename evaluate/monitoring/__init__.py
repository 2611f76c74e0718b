"""Monitoring of served versions: drift, live bias, service and feedback checks over a window of traffic."""
