"""The HTTP server: ``/v1/predict``, the Open Inference Protocol (v2) and ``/metrics``.

Importing this package does not import the app (FastAPI, uvicorn); ``sdde serve`` imports
:mod:`sdde_serve.server.cli`, which imports the rest when it runs.
"""
