"""Offline replay: a data set published through the inference path on a cron schedule."""
