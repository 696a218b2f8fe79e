"""Kafka side of graphinfer: the Faust app, its topics and the inference agent."""
