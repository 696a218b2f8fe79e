"""Request validation, features, the model repository and the inference engine.

A plain library: nothing here imports Kafka or PostgreSQL clients.
"""
