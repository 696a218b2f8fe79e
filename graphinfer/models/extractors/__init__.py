"""The built-in feature extractors, registered in :data:`graphinfer.models.features.REGISTRY`.

:mod:`graphinfer.models.features` imports the modules ``node``, ``edge``,
``graph`` and ``composite`` when it is imported; ``views`` builds the derived
forms of a graph that they share.
"""
